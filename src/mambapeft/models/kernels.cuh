// What our NVRTC-compiled kernels share (nvrtc.py hands this file to the compiler as a header).
// Macros: IN_BF16: a kernel's sequences (in_t) are bf16, else fp32. REVERSE: the kernel runs along
// time from the last step to the first (the backward direction of a bidirectional Vim block without
// flipping its tensors): every index t into a sequence is read as step length - 1 - t.
#pragma once

#define WARP 32
#define FULL_MASK 0xffffffffu

#if IN_BF16
typedef unsigned short in_t;
#else
typedef float in_t;
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
#if IN_BF16
__device__ __forceinline__ in_t to_in(float v) {  // round to nearest even, as PyTorch casts (NaN stays NaN)
#ifdef __CUDA_ARCH__
    in_t bits;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(v));
    return bits;
#else  // compiled for the CPU (tests/cuda_emulation.h): the same rounding, a quiet NaN for a NaN
    unsigned int bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (in_t)((bits >> 16) | 0x40u);
    return (in_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
#endif
}
#else
__device__ __forceinline__ in_t to_in(float v) { return v; }
#endif

__device__ __forceinline__ int at(int t, int length) { return REVERSE ? length - 1 - t : t; }

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }
