// Mamba's causal depthwise conv + SiLU, backward: causal-conv1d's causal_conv1d_bwd for channel-first
// x without states or sequence indices. Compiled at run time by NVRTC (conv_bwd.py sets the macros;
// reference: scan.causal_conv1d_torch under autograd).
//
// Forward: pre_t = bias + sum_k w_k x_{t-(W-1)+k} (x zero before the start), out_t = silu(pre_t).
// Backward: g_t = dout_t silu'(pre_t); dx_t = sum_k w_k g_{t+(W-1)-k} (g zero past the end);
// dw_k = sum over batch and t of g_t x_{t-(W-1)+k}; dbias = sum of g_t.
//
// Why not causal-conv1d's: at short sequences its kernel, a block of 128 threads per (batch, channel)
// row sized for 1,024 steps and more, leaves most threads idle (81 us at Vim-S's (32, 768, 197) on one
// H200, where the tensors stream in about 7). Here a block takes one channel over every batch row, a
// warp one row at a time (a whole row: conv_bwd.py runs it up to MAX_LENGTH = SEGMENT steps), reading
// its next row's x and dout into registers while it computes this one; the row's x goes into shared
// memory, each lane computes g at every 32nd step, into shared memory with the W-1 steps after the
// row, and dx from there. The weight and bias gradients sum in registers over the block's rows and are
// written once per channel: no atomics, nothing to zero.
//
// Shapes (elements): x, dout, dx: (batch, channels, length), any batch and channel strides, unit
// stride along time; weight: (channels, WIDTH) contiguous fp32; bias: (channels,) fp32;
// dweight: (channels, WIDTH) fp32, dbias: (channels,) fp32, both written.
// Macros: IN_BF16 (x, dout, dx bf16, else fp32), WIDTH (2 to 4), HAS_BIAS, SILU, REVERSE (kernels.cuh),
// ACCUMULATE (dx added to what it holds: the second direction of a Vim block, one gradient for both).

#include "kernels.cuh"

#define THREADS 128
// at most 102 registers a thread (five blocks a multiprocessor): it takes 64 (72 adding to dx), so
// Vim-S's 768 blocks run at once; allowed 128, it took 88 adding to dx and they ran in two waves (27.5
// against 20.9 us). With the next row read ahead, one H200, bf16, graph-timed: Vim-S's (32, 768, 197)
// 18.3 against 20.2 us (20.9 against 22.4 adding to dx), Mamba-1.4b's (32, 4096, 256) 88.7 against 107.5
#define MIN_BLOCKS 5
#define WARPS (THREADS / WARP)
#define SEGMENT 256          // the longest row (conv_bwd.MAX_LENGTH)
#define HALO (WIDTH - 1)     // the steps after a row's last whose g its dx reads (zero)
#define SPAN ((SEGMENT + 2 * HALO + WARP - 1) / WARP)  // a lane's steps of a row (with the halos)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// one row's x, from HALO steps before its start (zeros outside the sequence), and dout (zeros past the
// end), into registers: predicated and unrolled, every load issued before the first is waited for (read
// as the loop over steps needed them, a row was a chain of round trips: 24 -> 20 us a call at Vim-S,
// 172 -> 106 at Mamba-1.4b's (32, 4096, 256), one H200)
struct Row {
    in_t x[SPAN], dout[SPAN];
};

__device__ __forceinline__ void read_row(Row& r, const in_t* x_row, const in_t* dout_row, int length, int lane) {
#pragma unroll
    for (int j = 0; j < SPAN; ++j) {
        const int i = lane + j * WARP, source = i - HALO;
        r.x[j] = i < SEGMENT + 2 * HALO && source >= 0 && source < length ? x_row[at(source, length)] : (in_t)0;
        r.dout[j] = i < length ? dout_row[at(i, length)] : (in_t)0;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
conv_bwd(const in_t* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
         const in_t* __restrict__ dout, in_t* __restrict__ dx, float* __restrict__ dweight,
         float* __restrict__ dbias, int batch, int length,
         int x_sb, int x_sc, int dout_sb, int dout_sc, int dx_sb, int dx_sc) {
    __shared__ float g[WARPS][SEGMENT + HALO];  // per warp: g at the row's steps and the HALO after
    __shared__ float xs[WARPS][SEGMENT + 2 * HALO];  // per warp: x from HALO steps before the row
    __shared__ float sums[WARPS][WIDTH + 1];    // per warp: dweight, then dbias
    const int c = blockIdx.x, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float w[WIDTH], dw[WIDTH];
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) { w[k] = weight[c * WIDTH + k]; dw[k] = 0.f; }
    const float bias_c = HAS_BIAS ? bias[c] : 0.f;
    float db = 0.f;
    x += (long long)c * x_sc; dout += (long long)c * dout_sc; dx += (long long)c * dx_sc;
    Row next;
    if (warp < batch) read_row(next, x + (long long)warp * x_sb, dout + (long long)warp * dout_sb, length, lane);
    for (int b = warp; b < batch; b += WARPS) {
        const Row row = next;  // this row's; the warp's next row is read while this one is computed
        if (b + WARPS < batch)
            read_row(next, x + (long long)(b + WARPS) * x_sb, dout + (long long)(b + WARPS) * dout_sb, length, lane);
        in_t* dx_row = dx + (long long)b * dx_sb;
#pragma unroll
        for (int j = 0; j < SPAN; ++j) {
            const int i = lane + j * WARP;
            if (i < SEGMENT + 2 * HALO) xs[warp][i] = to_float(row.x[j]);
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < SPAN; ++j) {
            const int i = lane + j * WARP;
            if (i >= length + HALO) continue;
            float pre = bias_c, g_t = to_float(row.dout[j]);
#pragma unroll
            for (int k = 0; k < WIDTH; ++k) pre += w[k] * xs[warp][i + k];
#if SILU
            const float sig = sigmoid(pre);
            g_t *= sig * (1.f + pre * (1.f - sig));
#endif
            if (i < length) {
#pragma unroll
                for (int k = 0; k < WIDTH; ++k) dw[k] += g_t * xs[warp][i + k];
                db += g_t;
            }
            g[warp][i] = g_t;  // zero past the end (dout is)
        }
        __syncwarp();
        // ACCUMULATE: added to what dx holds, as PyTorch adds two tensors (rounded, then the sum), every
        // read issued before the first store (the compiler keeps a store before a read it cannot prove
        // elsewhere: one round trip a step); read here, not with the next row (more registers: slower)
        in_t held[SEGMENT / WARP];
#pragma unroll
        for (int j = 0; j < SEGMENT / WARP; ++j)
            if (ACCUMULATE && lane + j * WARP < length) held[j] = dx_row[at(lane + j * WARP, length)];
#pragma unroll
        for (int j = 0; j < SEGMENT / WARP; ++j) {
            const int i = lane + j * WARP;
            if (i >= length) continue;
            float dx_t = 0.f;
#pragma unroll
            for (int k = 0; k < WIDTH; ++k) dx_t += w[k] * g[warp][i + HALO - k];
            dx_row[at(i, length)] = ACCUMULATE ? to_in(to_float(held[j]) + to_float(to_in(dx_t))) : to_in(dx_t);
        }
        __syncwarp();  // read before the next row overwrites them
    }
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) dw[k] = warp_sum(dw[k]);
    db = warp_sum(db);
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < WIDTH; ++k) sums[warp][k] = dw[k];
        sums[warp][WIDTH] = db;
    }
    __syncthreads();
    if (threadIdx.x <= WIDTH) {
        float total = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) total += sums[v][threadIdx.x];
        if (threadIdx.x < WIDTH) dweight[c * WIDTH + threadIdx.x] = total;
        else if (HAS_BIAS) dbias[c] = total;
    }
}
