// Just enough of CUDA for our NVRTC kernels (src/mambapeft/models/*.cu) to compile as C++ and run on the
// CPU: what they call of CUDA (thread and block indices, barriers, warp shuffles, float atomics, the
// vector types) emulated, one block at a time, each CUDA thread a fiber (ucontext) that runs until it
// reaches a barrier or a shuffle and hands over to the next. __shared__ variables are the kernel's
// static locals: one copy that a block's fibers share. Math is the C library's (no fast math): the
// kernels' logic (indexing, reductions, the order of their steps) is what this checks, not their
// rounding on a GPU; and it runs one order of the threads (each to its next barrier or shuffle in turn),
// so a race between two barriers that a GPU's timing would expose goes unseen. cuda_emulation.py compiles
// and launches (conftest.py's kernel_device).
#pragma once
#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <csetjmp>
#include <functional>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
using std::max;
using std::min;

inline float __uint_as_float(unsigned bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float atomicAdd(float* at, float value) {  // one fiber runs at a time: a plain add is atomic
    const float old = *at;
    *at = old + value;
    return old;
}

namespace emulation {
constexpr int WARP_SIZE = 32;
struct Index { unsigned x, y, z; };
// a fiber starts on its own stack through makecontext and swapcontext, and switches afterwards by
// _setjmp and _longjmp: no system call a switch (swapcontext saves and restores the signal mask: the
// scan backward at (4, 96, 197) took 2.9 s with it at every switch, 0.26 s so)
struct Fiber {
    ucontext_t context;
    std::jmp_buf at;
    std::vector<char> stack;
    Index index;
    bool started, done;
};
struct Barrier {
    int arrived = 0;
    long generation = 0;
};
inline std::vector<Fiber> fibers;
inline int current = 0;
inline ucontext_t scheduler_context;
inline std::jmp_buf scheduler;
inline Index block_index;
inline std::vector<Barrier> warp_barriers;
inline Barrier block_barrier;
inline std::vector<float> exchanged;  // a shuffle's values, one a thread
inline std::function<void()> body;
inline bool progressed = false;  // a fiber arrived at a barrier or finished since the scheduler's last round

inline void yield() {
    if (!_setjmp(fibers[current].at)) _longjmp(scheduler, 1);
}

inline void wait_at(Barrier& barrier, int count) {
    const long generation = barrier.generation;
    progressed = true;
    if (++barrier.arrived == count) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    while (barrier.generation == generation) yield();
}

inline int warp_threads(int warp) { return std::min<int>(WARP_SIZE, (int)fibers.size() - warp * WARP_SIZE); }
inline void sync_warp() { wait_at(warp_barriers[current / WARP_SIZE], warp_threads(current / WARP_SIZE)); }
inline void sync_block() { wait_at(block_barrier, (int)fibers.size()); }

inline float shuffle_xor(float value, int lane_mask) {
    exchanged[current] = value;
    sync_warp();  // every lane's value written
    const float partner = exchanged[(current & ~(WARP_SIZE - 1)) | ((current % WARP_SIZE) ^ lane_mask)];
    sync_warp();  // every lane's read before the next shuffle writes
    return partner;
}

inline void fiber_main() {
    body();
    fibers[current].done = true;
    progressed = true;
    _longjmp(scheduler, 1);  // never returns: its stack is left as it is
}

template <class... P, std::size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

// kernel<<<(gx, gy, gz), threads>>>(args: pointers to each argument's value, as cuLaunchKernel takes
// them): 0, or 1 where its threads stopped at barriers that can never open (a deadlock, said on stderr)
template <class... P>
int launch(void (*kernel)(P...), unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    body = [&] { call(kernel, args, std::index_sequence_for<P...>()); };
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                block_index = {x, y, z};
                fibers.assign(threads, Fiber{});
                exchanged.assign(threads, 0.f);
                warp_barriers.assign((threads + WARP_SIZE - 1) / WARP_SIZE, Barrier{});
                block_barrier = Barrier{};
                for (unsigned i = 0; i < threads; ++i) {
                    Fiber& fiber = fibers[i];
                    fiber.index = {i, 0, 0};
                    fiber.started = fiber.done = false;
                    fiber.stack.resize(1 << 18);
                    getcontext(&fiber.context);
                    fiber.context.uc_stack.ss_sp = fiber.stack.data();
                    fiber.context.uc_stack.ss_size = fiber.stack.size();
                    fiber.context.uc_link = nullptr;
                    makecontext(&fiber.context, fiber_main, 0);
                }
                for (bool running = true; running;) {
                    running = progressed = false;
                    for (current = 0; current < (int)threads; ++current) {
                        if (fibers[current].done) continue;
                        running = true;
                        if (_setjmp(scheduler)) continue;  // back from the fiber
                        Fiber& fiber = fibers[current];
                        if (fiber.started) _longjmp(fiber.at, 1);
                        fiber.started = true;
                        swapcontext(&scheduler_context, &fiber.context);
                    }
                    if (running && !progressed) {
                        std::fprintf(stderr, "cuda emulation: block (%u, %u, %u) deadlocked at its barriers\n", x, y,
                                     z);
                        return 1;
                    }
                }
            }
    return 0;
}
}  // namespace emulation

#define threadIdx (emulation::fibers[emulation::current].index)
#define blockIdx (emulation::block_index)
#define __syncthreads() emulation::sync_block()
#define __syncwarp(...) emulation::sync_warp()
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) { return emulation::shuffle_xor(value, lane_mask); }

// a kernel of the file as the C function emulated_<kernel>(gx, gy, gz, threads, args) -> 0 or 1 (launch)
#define EMULATED(kernel)                                                                             \
    extern "C" int emulated_##kernel(unsigned gx, unsigned gy, unsigned gz, unsigned threads,       \
                                     void** args) {                                                 \
        return emulation::launch(kernel, gx, gy, gz, threads, args);                                \
    }
