// Mamba's selective scan (real A, per-step B and C of one group, N <= 24 states), forward and backward,
// for training at short lengths (Vim's 197 tokens, language models' 256). Compiled at run time by NVRTC
// (scan_short.py sets the macros below; reference: scan.selective_scan_torch).
//
// Four lanes per (batch, channel), OWN = ceil(N / 4) of its states each in registers (four at Mamba's
// default N = 16; the last lane's past N are zero: no input, no output), stepping through time: no
// parallel scan along time (mamba-ssm's kernels run one per state per step, and at these lengths that,
// not memory, takes the time). A block of 128 threads holds 32 channels of one batch. Sums over a
// channel's states (y, the delta and u gradients) are summed over its four lanes four steps at once,
// each lane left one step's (three shuffles a sum for four steps); dB and dC, sums over channels, a
// butterfly over the warp's 8 channels that leaves each lane one of its 32 sums (16 states x {dB,
// dC}; past 16 states, one more such round per four more a lane owns, of half the values for one or
// two), then the block's four warps' by shared memory, then one global atomic per (state, step).
//
// Per-step work of a channel (softplus, the gate and their gradients) is done once per (channel, step)
// by the thread that read the step from global memory, before the recurrence (into an fp32 tile, one
// float4 a (step, channel): a lane reads a step's inputs in one access), and by the thread that stores
// it, after: no pass over shared tiles in between (at Vim-S's shape, one H200: the forward 65.8 -> 61.6
// us, the backward 209.4 -> 192.9, with the backward's reads below).
//
// The backward needs each step's state in reverse order. It walks the chunks of CHUNK steps from the
// last: recomputes the chunk's states from the checkpoint at or before it (the state every KEEP_EVERY
// steps) into shared memory, and steps back through them. The checkpoints (fp32) are written by the
// forward where the caller keeps them (keep_states: one pass over time less in the backward, ~15% of it
// at Vim-S), else by a first pass of the backward, as scratch.
//
// Global memory holds a channel's steps contiguously, and a warp steps 8 channels at once: reading
// each one's step from its own row would touch a cache line per channel and step. Tiles of (TILE steps
// x 32 channels) go through shared memory instead, each row of TILE steps read or written by a warp in
// one coalesced access.
//
// Shapes (elements; any batch and channel strides, unit stride along time):
//   u, delta, z, out, out_z, dout, du, ddelta, dz: (batch, channels, length); out (y) is written only
//   without z, and the backward recomputes y instead of reading it
//   A: (channels, N) contiguous fp32 (with A_LOG: A_log, the state matrix -exp(A_log)); B, C: (batch,
//   N, length), any strides (the fused function's are views of x_proj's token-major output); D,
//   delta_bias: (channels,) fp32; offset: (channels, N) contiguous fp32, state-offset tuning's h': the
//   output reads the state as h + h' (y = C (h + h') + D u; h' never enters the recurrence)
//   dA (with A_LOG: A_log's gradient), doffset: (channels, N), dB, dC: (batch, N, length) (any strides),
//   dD, ddelta_bias: (channels,), all fp32, zeroed
//   ckpt: (batch, ceil(length / KEEP_EVERY), NPAD, channels) fp32: the state before every KEEP_EVERY-th
//   step but the first, written by the forward with keep_states, else by the backward (states_given 0)
// Macros: NSTATE (N), IN_BF16 (u, delta, z, dout, out, out_z and the gradients of the first three: bf16,
//   else fp32), BC_BF16 (B, C), HAS_D, HAS_Z, HAS_BIAS, HAS_OFFSET, SOFTPLUS, CHUNK (a divisor of TILE), KEEP_EVERY
//   (steps between checkpoints: a multiple of CHUNK and a divisor of TILE), REVERSE
//   (kernels.cuh), ACCUMULATE (the forward's out or out_z and the backward's dz added to what they hold:
//   the second direction of a Vim block, one tensor for both), STORES_OUT_Z (the backward writes out_z),
//   A_LOG (A given as A_log: a trained A_log's -exp and its gradient's product here, not four kernels
//   outside a direction's forward and backward).

#include "kernels.cuh"

// a compile-time bool as a lambda's argument: the step loops of a whole tile or chunk (every step
// before the end) are instantiated without their per-step checks, straight-line code the compiler
// schedules across steps (~3% of the forward, ~4% of the backward at Vim-S)
template <bool V> struct Flag { static constexpr bool value = V; };

#define LANES 4                     // lanes per channel
#define OWN ((NSTATE + LANES - 1) / LANES)  // states per lane
#define NPAD (OWN * LANES)          // the states the lanes hold, the last lane's past NSTATE zero
#define ROUNDS ((OWN + 3) / 4)      // butterflies of the dB, dC sums a step (each sums four states a lane)
#define SUM_PASSES ((CHUNK * NSTATE + THREADS - 1) / THREADS)  // a chunk's (state, step) pairs a thread
// channels per block (128 threads; 16 past 16 states was slower: at 22 states, Vim-S's shape, one H200,
// graph-timed, the forward 84.5 -> 78.3 us and the backward 305.1 -> 268.5 with 32, fewer blocks summing
// dB and dC by global atomics; the backward's shared memory, 31.9 KB at 22 states, under the 48 KB of
// static shared memory a block may hold)
#define CHANNELS 32
#define THREADS (CHANNELS * LANES)
#define WARPS (THREADS / WARP)
#define SUMS_ROW (2 * NPAD + 4)   // a step's dB and dC sums, padded: a state's CHUNK steps in distinct banks
#define TILE 16                     // steps a tile holds
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define PER_STEP (HAS_Z ? 3 : 2)  // the backward's sums over a channel's states a step: d loss / d dt, of g B, y
// the sums over channels and steps the backward computes (scan_short.py sets them where the caller wants
// the gradient: not of a frozen A, D or delta_bias, a LoRA's training): d loss / d A (an FFMA a state and
// step, and four registers through the walk; without the three the backward 188.1 -> 171.9 us at
// Vim-S's shape, 186.2 -> 177.1 in reverse, one H200), / d D, / d delta_bias
#ifndef WANTS_DA
#define WANTS_DA 1
#endif
#ifndef A_LOG
#define A_LOG 0
#endif
#ifndef WANTS_DD
#define WANTS_DD 1
#endif
#ifndef WANTS_DBIAS
#define WANTS_DBIAS 1
#endif

#if BC_BF16
typedef unsigned short bc_t;
#else
typedef float bc_t;
#endif

// delta + bias, through softplus: log(1 + e^x) = max(x, 0) + log1p(e) with e = e^-|x| in (0, 1], and
// log1p(e) = 2 atanh(e / (2 + e)) = q (1 + q^2 / 12 + q^4 / 80 + ...), q = e / (1 + e / 2) in (0, 2/3]: 13
// instructions and no branch where log1pf(expf(x)) (mamba-ssm's) takes ~35 and a branch; as close to
// float64's softplus (6.4e-7 relative for x > -10, where dt lies, against its 5.6e-7: both with fast math's
// expf), x past 20 itself, as mamba-ssm returns it (q p under half its ulp), NaN kept (through q)
__device__ __forceinline__ float step_size(float raw) {
#if SOFTPLUS
    const float e = exp2f(-fabsf(raw) * LOG2E), q = e / fmaf(e, 0.5f, 1.f), q2 = q * q;
    float p = 1.f / 11264.f;  // 1 / (4^k (2k + 1)), k = 5 .. 1: the terms left out under 1.5e-7 of the sum
    p = fmaf(p, q2, 1.f / 2304.f);
    p = fmaf(p, q2, 1.f / 448.f);
    p = fmaf(p, q2, 1.f / 80.f);
    p = fmaf(p, q2, 1.f / 12.f);
    return fmaf(q, fmaf(p, q2, 1.f), fmaxf(raw, 0.f));
#else
    return raw;
#endif
}

__device__ __forceinline__ float silu(float z) { return z / (1.f + expf(-z)); }

// the state matrix's entry from what the kernels are given: A, or with A_LOG A_log (A = -exp(A_log), as
// the mixer computes it; d loss / d A_log = A d loss / d A)
__device__ __forceinline__ float state_matrix(float given) { return A_LOG ? -expf(given) : given; }

// the state as the output reads it: h, plus state-offset tuning's h'
#define READ_STATE(state, s) (HAS_OFFSET ? (state) + off[s] : (state))

#define PAD (4 / (int)sizeof(in_t))  // a tile's row padded by one bank: a column's elements in 32 banks
typedef in_t tile_t[TILE][CHANNELS + PAD];   // [step][channel], the sequences' dtype
// [step][channel]: four fp32 values, one 16-byte access; rows padded by one: a channel's steps (the
// backward's reads mapping, its walk's four steps at once) in distinct banks
typedef float4 qtile_t[TILE][CHANNELS + 1];

// The forward reads a tile's elements from global memory into registers a tile ahead of their use (the
// next tile's while the current one is computed: the read's latency, not the arithmetic, bounded it);
// the backward at the tile's start (see there). Thread i holds step i % TILE of channels i / TILE, + 8, ...
// (the reads' mapping)
#define TILE_ROWS (CHANNELS * TILE / THREADS)   // 4 channels' elements per thread
#define STATE_ROWS ((NPAD * TILE + THREADS - 1) / THREADS)  // 2 states' elements per thread at N = 16
#define ROW(i) ((int)threadIdx.x / TILE + (i) * (THREADS / TILE))

// rows: the block's first channel's sequence; zeros past the end
__device__ __forceinline__ void fetch(in_t (&v)[TILE_ROWS], const in_t* rows, int channel_stride, int channels_left,
                                      int t0, int length) {
    const int t = t0 + threadIdx.x % TILE;
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i)
        v[i] = ROW(i) < channels_left && t < length ? rows[(long long)ROW(i) * channel_stride + at(t, length)] : (in_t)0;
}

__device__ __forceinline__ void put(tile_t& tile, const in_t (&v)[TILE_ROWS]) {
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i) tile[threadIdx.x % TILE][ROW(i)] = v[i];
}

// B or C into shared memory as [step][state] floats. Which (step, state) pairs a thread reads: where
// consecutive states are adjacent in memory (the fused function's B and C, views of x_proj's
// token-major output), consecutive threads take consecutive states of a step (a step's states in one
// access, and no bank conflicts writing them: Vim-S's shape, one H200, the second direction's backward
// 198 -> 191 us, the first's and the forwards 0.5-1.5 us less); else consecutive steps of a state (one
// row at a unit time stride)
__device__ __forceinline__ int2 state_element(int i, bool states_adjacent) {  // (step, state)
    const int e = threadIdx.x + i * THREADS;
    return states_adjacent ? make_int2(e / NPAD, e % NPAD) : make_int2((int)threadIdx.x % TILE, ROW(i));
}

__device__ __forceinline__ void fetch_states(bc_t (&v)[STATE_ROWS], const bc_t* from, int state_stride, int time_stride,
                                             int t0, int length) {
#pragma unroll
    for (int i = 0; i < STATE_ROWS; ++i) {
        const int2 e = state_element(i, state_stride == 1);
        const int t = t0 + e.x;
        v[i] = t < length && e.x < TILE && e.y < NSTATE ? from[e.y * state_stride + at(t, length) * time_stride] : (bc_t)0;
    }
}

__device__ __forceinline__ void put_states(float (*to)[NPAD], const bc_t (&v)[STATE_ROWS], int state_stride) {
#pragma unroll
    for (int i = 0; i < STATE_ROWS; ++i) {
        const int2 e = state_element(i, state_stride == 1);
        if (e.x < TILE && e.y < NPAD) to[e.x][e.y] = to_float(v[i]);
    }
}

// The per-(step, channel) work is done in the reads' mapping (thread i: step i % TILE of channels
// ROW(0), ROW(1), ...), from the registers the reads filled and into the stores: no pass over the tiles
// in between (three fewer shared-memory round trips an element and two barriers a tile in the backward)

// per channel of the block, read once: `from`'s value (delta_bias, D), or 0 without it
__device__ __forceinline__ void channel_values(float* to, const float* from, bool has, int c0, int channels) {
    if ((int)threadIdx.x < CHANNELS) to[threadIdx.x] = has ? from[min(c0 + (int)threadIdx.x, channels - 1)] : 0.f;
}

// (dt, dt u) of one (step, channel): dt = softplus(delta + bias); the forward's and the backward's alike,
// so the backward recomputes the forward's states bit for bit
__device__ __forceinline__ float2 dt_dtu_of(float delta, float u, float bias) {
    const float dt = step_size(delta + bias);
    return make_float2(dt, dt * u);
}

// a Vim block's second direction added to what the first stored, rounded once more as PyTorch adds the
// two (ACCUMULATE); __fadd_rn: never fused with the product that made `value` (fp32: to_in rounds nothing)
__device__ __forceinline__ in_t added(in_t held, in_t value) { return to_in(__fadd_rn(to_float(held), to_float(value))); }

// (dt, dt u) of the (step, channel) pairs the thread read, into .x and .y
__device__ __forceinline__ void put_step_sizes(qtile_t& q, const in_t (&u)[TILE_ROWS], const in_t (&delta)[TILE_ROWS],
                                               const float* bias) {
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i)
        *reinterpret_cast<float2*>(&q[threadIdx.x % TILE][ROW(i)]) = dt_dtu_of(to_float(delta[i]), to_float(u[i]), bias[ROW(i)]);
}

// the forward's output of the tile: y = the sum over states (q's .y) + D u, times silu(z) with z,
// stored; with ACCUMULATE added to what `rows` holds (`added`; every read issued before the first
// store: the compiler keeps a store before a read it cannot prove elsewhere)
__device__ __forceinline__ void store_outputs(in_t* rows, int channel_stride, int left, int t0, int length,
                                              const qtile_t& q, const tile_t& u_tile, const tile_t& z_tile,
                                              const float* D) {
    const int k = threadIdx.x % TILE, t = t0 + k;
    in_t held[TILE_ROWS];
    if (ACCUMULATE) fetch(held, rows, channel_stride, left, t0, length);
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i) {
        const int ch = ROW(i);
        if (ch >= left || t >= length) continue;
        const float y = q[k][ch].y + D[ch] * to_float(u_tile[k][ch]);
        const in_t value = to_in(HAS_Z ? y * silu(to_float(z_tile[k][ch])) : y);
        rows[ch * (long long)channel_stride + at(t, length)] = ACCUMULATE ? added(held[i], value) : value;
    }
}

__device__ __forceinline__ float2 dt_dtu(const qtile_t& q, int k, int slot) {
    return *reinterpret_cast<const float2*>(&q[k][slot]);
}

// h, a lane's states, through step k of the tile: the forward's update (which also sums y as it goes), so that
// the backward's recomputed states are the forward's bit for bit
__device__ __forceinline__ void advance(float (&h)[OWN], const qtile_t& steps, const float (&Bs)[TILE][NPAD],
                                        const float (&A2)[OWN], int k, int slot, int group) {
    const float2 in = dt_dtu(steps, k, slot);
#pragma unroll
    for (int s = 0; s < OWN; ++s) h[s] = exp2f(in.x * A2[s]) * h[s] + Bs[k][group * OWN + s] * in.y;
}

// One butterfly level over the lanes `lane_width` apart: each keeps the half of v[0 .. 2 half) on its
// side of the pair plus the partner's values of that half, in v[0 .. half)
template <int lane_width, int half, int size>
__device__ __forceinline__ void fold(float (&v)[size]) {
    const bool upper = threadIdx.x & lane_width;
#pragma unroll
    for (int i = 0; i < half; ++i) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL_MASK, send, lane_width);
    }
}

// v: `per_step` values of each of four steps, over this lane's states; summed over the channel's four
// lanes, the lane of state group g left step g's in v[0 .. per_step): 3 per_step shuffles for four
// steps, where summing each step's values over the lanes takes 8 per_step
template <int per_step>
__device__ __forceinline__ void sum_steps_over_lanes(float (&v)[LANES * per_step]) {
    static_assert(LANES == 4, "a step's sums a lane");
    fold<2, 2 * per_step>(v);
    fold<1, per_step>(v);
}

// v (four dB then four dC terms of a lane's) summed over the warp's 8 channels: lane l gets entry l / LANES
// of the lanes of its state group (l % LANES)
__device__ __forceinline__ float warp_channel_sums(float (&v)[8]) {
    fold<16, 4>(v); fold<8, 2>(v); fold<4, 1>(v);
    return v[0];
}

// v (two dB then two dC terms of a lane's) summed over the warp's 8 channels: lanes l and l ^ 4 get
// entry (l / 8) % 4 of the lanes of their state group (l % LANES); 4 shuffles where warp_channel_sums
// takes 7 (a round of two states padded to four)
__device__ __forceinline__ float warp_channel_pair_sums(float (&v)[4]) {
    fold<16, 2>(v); fold<8, 1>(v);
    return v[0] + __shfl_xor_sync(FULL_MASK, v[0], 4);
}

// a butterfly round's values: the dB terms (terms[0 .. OWN)) of the lane's states first .. first + size / 2,
// then their dC terms (terms[OWN .. 2 OWN)), zero past the lane's OWN
template <int size>
__device__ __forceinline__ void round_terms(float (&v)[size], const float (&terms)[2 * OWN], int first) {
#pragma unroll
    for (int r = 0; r < size / 2; ++r) {
        const int s = first + r;
        v[r] = s < OWN ? terms[s] : 0.f;
        v[size / 2 + r] = s < OWN ? terms[OWN + s] : 0.f;
    }
}

// v[i]: this thread's term of channel ROW(i) at its step (the reads' mapping below), summed over the
// tile's steps (the half-warp's 16 lanes) and added to sums[channel] by one lane per channel (no atomics)
__device__ __forceinline__ void add_column_sums(float* sums, float (&v)[TILE_ROWS]) {
    static_assert(TILE == 16 && TILE_ROWS == 4, "a half-warp's steps, four channels a thread");
    fold<8, 2>(v); fold<4, 1>(v);  // lane l left entry 2 (l >> 3 & 1) + (l >> 2 & 1), over 4 lanes
    v[0] += __shfl_xor_sync(FULL_MASK, v[0], 2);
    v[0] += __shfl_xor_sync(FULL_MASK, v[0], 1);
    if (threadIdx.x % 4 == 0) sums[ROW((threadIdx.x >> 3 & 1) * 2 + (threadIdx.x >> 2 & 1))] += v[0];
}

// what the backward's walk reads of each (step, channel) the thread read, (dt, dt u, d loss / d y, u),
// into q; d loss / d D's terms into dD_sums
__device__ __forceinline__ void step_inputs(qtile_t& q, float* dD_sums, const in_t (&u)[TILE_ROWS],
                                            const in_t (&delta)[TILE_ROWS],
                                            const in_t (&dout)[TILE_ROWS], const in_t (&z)[TILE_ROWS],
                                            const float* bias) {
    const int k = threadIdx.x % TILE;
    float dD[TILE_ROWS];
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i) {  // zeros past the last channel and step: dy 0, no sums
        const int ch = ROW(i);
        const float u_t = to_float(u[i]);
        const float2 step = dt_dtu_of(to_float(delta[i]), u_t, bias[ch]);
        float dy = to_float(dout[i]);
        if (HAS_Z) dy *= silu(to_float(z[i]));  // out_z = y silu(z)
        q[k][ch] = make_float4(step.x, step.y, dy, u_t);
        dD[i] = dy * u_t;
    }
    if (HAS_D && WANTS_DD) add_column_sums(dD_sums, dD);
}

// the tile's du (du_tile, from the walk), ddelta (through softplus: d loss / d (delta + bias)), dz and
// out_z (from q's y), stored; d loss / d delta_bias's terms into dbias_sums. With ACCUMULATE, dz added to
// what it holds (every read issued before the first store: the compiler keeps a store before a read it
// cannot prove elsewhere)
__device__ __forceinline__ void store_gradients(in_t* du, in_t* ddelta, in_t* dz, in_t* out_z, int du_sc, int ddelta_sc,
                                                int dz_sc, int out_z_sc, int left, int t0, int length, const qtile_t& q,
                                                const tile_t& du_tile, const tile_t& delta_tile, const tile_t& dout_tile,
                                                const tile_t& z_tile, float* dbias_sums, const float* bias) {
    const int k = threadIdx.x % TILE, t = t0 + k;
    in_t held[TILE_ROWS];
    if (HAS_Z && ACCUMULATE) fetch(held, dz, dz_sc, left, t0, length);
    float dbias[TILE_ROWS];
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i) {
        const int ch = ROW(i);
        const bool stored = ch < left && t < length;
        const float4 s = q[k][ch];  // d loss / d dt, _, y (with z), _
        const float raw = to_float(delta_tile[k][ch]) + bias[ch];
        float ddt = s.x;
#if SOFTPLUS
        if (raw <= 20.f) ddt *= 1.f / (1.f + expf(-raw));
#endif
        dbias[i] = stored ? ddt : 0.f;
        if (!stored) continue;
        const long long at_t = at(t, length);
        du[ch * (long long)du_sc + at_t] = du_tile[k][ch];
        ddelta[ch * (long long)ddelta_sc + at_t] = to_in(ddt);
        if (HAS_Z) {  // out_z = y silu(z)
            const float z_t = to_float(z_tile[k][ch]), sig = sigmoid(z_t), y = s.z;
            const in_t dz_t = to_in(y * (to_float(dout_tile[k][ch]) * sig * (1.f + z_t * (1.f - sig))));
            dz[ch * (long long)dz_sc + at_t] = ACCUMULATE ? added(held[i], dz_t) : dz_t;
            if (STORES_OUT_Z) out_z[ch * (long long)out_z_sc + at_t] = to_in(y * silu(z_t));
        }
    }
    if (HAS_BIAS && WANTS_DBIAS) add_column_sums(dbias_sums, dbias);
}

// whether state s of the lane of state group `group` is one of the NSTATE (not padding)
#define REAL_STATE(group, s) (NPAD == NSTATE || (group) * OWN + (s) < NSTATE)

// the block's sequence pointers: batch b, its first channel
#define ROWS(ptr, name) ptr + (long long)b * name##_sb + (long long)c0 * name##_sc

// The layout's sizes and strides where scan_short.py compiled them in (KNOWN_FORWARD_ARGS and
// KNOWN_BACKWARD_ARGS, each kernel's: assignments such as "length=197;u_sc=6304;" to its arguments of
// those names): the compiler then folds them into each read's and store's address
#ifndef KNOWN_FORWARD_ARGS
#define KNOWN_FORWARD_ARGS
#endif
#ifndef KNOWN_BACKWARD_ARGS
#define KNOWN_BACKWARD_ARGS
#endif

// what every kernel starts with: the thread's channel (slot) and state group, its states' A and offset
#define THREAD_SETUP                                                                                  \
    const int b = blockIdx.y, c0 = blockIdx.x * CHANNELS, left = channels - c0;                       \
    const int slot = threadIdx.x / LANES, group = threadIdx.x % LANES;                                \
    const int c = min(c0 + slot, channels - 1); /* past the last channel: its values, never stored */ \
    Bm += (long long)b * B_sb;                                                                        \
    Cm += (long long)b * C_sb;                                                                        \
    float A2[OWN], h[OWN], off[OWN];                                                                  \
    _Pragma("unroll") for (int s = 0; s < OWN; ++s) {                                                 \
        const bool real = REAL_STATE(group, s); /* else decay 1, input and output 0: it stays 0 */    \
        A2[s] = real ? state_matrix(A[c * NSTATE + group * OWN + s]) * LOG2E : 0.f;                   \
        off[s] = HAS_OFFSET && real ? offset[c * NSTATE + group * OWN + s] : 0.f;                     \
        h[s] = 0.f;                                                                                   \
    }

// The backward's recomputed states of one chunk, per step and thread: a lane's four in one 16-byte
// access (four 4-byte ones: ~3% slower); past four, one 4-byte access a state
#if OWN == 4
typedef float4 chunk_states_t[CHUNK][THREADS];
__device__ __forceinline__ void keep_state(chunk_states_t& to, int j, const float (&h)[OWN]) {
    to[j][threadIdx.x] = make_float4(h[0], h[1], h[2], h[3]);
}
__device__ __forceinline__ void kept_state(float (&h)[OWN], const chunk_states_t& from, int j) {
    const float4 v = from[j][threadIdx.x];
    h[0] = v.x; h[1] = v.y; h[2] = v.z; h[3] = v.w;
}
#else
typedef float chunk_states_t[CHUNK][OWN][THREADS];
__device__ __forceinline__ void keep_state(chunk_states_t& to, int j, const float (&h)[OWN]) {
#pragma unroll
    for (int s = 0; s < OWN; ++s) to[j][s][threadIdx.x] = h[s];
}
__device__ __forceinline__ void kept_state(float (&h)[OWN], const chunk_states_t& from, int j) {
#pragma unroll
    for (int s = 0; s < OWN; ++s) h[s] = from[j][s][threadIdx.x];
}
#endif

// this thread's states in the checkpoints (batch, checkpoints, NPAD, channels): [checkpoint][state] at stride
// channels
static_assert(KEEP_EVERY % CHUNK == 0 && TILE % KEEP_EVERY == 0, "checkpoints at chunk starts, within a tile");
#define CHECKPOINTS(ckpt) \
    (ckpt + (long long)b * ((length + KEEP_EVERY - 1) / KEEP_EVERY) * NPAD * channels + (long long)(group * OWN) * channels + c)

// h, the state after step t - 1, as the checkpoint at step t (a multiple of KEEP_EVERY)
__device__ __forceinline__ void keep_checkpoint(float* checkpoint, const float (&h)[OWN], int t, int length,
                                                int channels, bool keeps) {
    if (keeps && t < length) {
#pragma unroll
        for (int s = 0; s < OWN; ++s) checkpoint[((long long)(t / KEEP_EVERY) * NPAD + s) * channels] = h[s];
    }
}

// six blocks a multiprocessor (80 registers or fewer): Vim-S's 768 blocks run at once
extern "C" __global__ void __launch_bounds__(THREADS, 6)
scan_fwd(const in_t* __restrict__ u, const in_t* __restrict__ delta, const float* __restrict__ A,
         const bc_t* __restrict__ Bm, const bc_t* __restrict__ Cm, const float* __restrict__ Dskip,
         const in_t* __restrict__ z, const float* __restrict__ delta_bias, const float* __restrict__ offset,
         in_t* __restrict__ out, in_t* __restrict__ out_z, float* __restrict__ ckpt,
         int channels, int length, int keep_states,
         int u_sb, int u_sc, int delta_sb, int delta_sc, int z_sb, int z_sc,
         int B_sb, int B_sn, int B_sl, int C_sb, int C_sn, int C_sl, int out_sb, int out_sc, int out_z_sb, int out_z_sc) {
    __shared__ tile_t u_tile, z_tile;
    __shared__ qtile_t steps;  // per (step, channel): dt, dt u (then the sum over states of C h)
    __shared__ float Bs[TILE][NPAD], Cs[TILE][NPAD];
    __shared__ float bias_s[CHANNELS], D_s[CHANNELS];
    KNOWN_FORWARD_ARGS
    THREAD_SETUP
    channel_values(bias_s, delta_bias, HAS_BIAS, c0, channels);  // read before the first tile's barriers
    channel_values(D_s, Dskip, HAS_D, c0, channels);
    u = ROWS(u, u); delta = ROWS(delta, delta); z = ROWS(z, z);
    out = ROWS(out, out); out_z = ROWS(out_z, out_z);
    float* checkpoint = CHECKPOINTS(ckpt);
    const bool keeps = keep_states && slot < left;
    in_t u_next[TILE_ROWS], delta_next[TILE_ROWS], z_next[TILE_ROWS];
    bc_t B_next[STATE_ROWS], C_next[STATE_ROWS];
    fetch(u_next, u, u_sc, left, 0, length);
    fetch(delta_next, delta, delta_sc, left, 0, length);
    if (HAS_Z) fetch(z_next, z, z_sc, left, 0, length);
    fetch_states(B_next, Bm, B_sn, B_sl, 0, length);
    fetch_states(C_next, Cm, C_sn, C_sl, 0, length);
    for (int t0 = 0; t0 < length; t0 += TILE) {
        __syncthreads();  // the last tile's output is stored
        put_step_sizes(steps, u_next, delta_next, bias_s);
        put(u_tile, u_next);
        if (HAS_Z) put(z_tile, z_next);
        put_states(Bs, B_next, B_sn); put_states(Cs, C_next, C_sn);
        __syncthreads();
        fetch(u_next, u, u_sc, left, t0 + TILE, length);  // the next tile's, read while this one is computed
        fetch(delta_next, delta, delta_sc, left, t0 + TILE, length);
        if (HAS_Z) fetch(z_next, z, z_sc, left, t0 + TILE, length);
        fetch_states(B_next, Bm, B_sn, B_sl, t0 + TILE, length);
        fetch_states(C_next, Cm, C_sn, C_sl, t0 + TILE, length);
        // the tile's steps, four at a time: their y summed over the channel's lanes at once (the steps'
        // shared-memory reads then move ahead of the sums: 5% of the forward at Vim-S, 9% at 22
        // states, with the float4 tile); full: all before the end
        static_assert(TILE % LANES == 0, "whole groups of steps");
        auto walk = [&](auto full) {
#pragma unroll
            for (int k0 = 0; k0 < TILE; k0 += LANES) {  // unrolled: shared-memory offsets known at compile time
                float y[LANES];
#pragma unroll
                for (int i = 0; i < LANES; ++i) {
                    const int k = k0 + i;
                    y[i] = 0.f;
                    if (!decltype(full)::value && t0 + k >= length) continue;
                    const float2 in = dt_dtu(steps, k, slot);
                    const float dt = in.x, dtu = in.y;
#pragma unroll
                    for (int s = 0; s < OWN; ++s) {
                        const int n = group * OWN + s;
                        h[s] = exp2f(dt * A2[s]) * h[s] + Bs[k][n] * dtu;
                        y[i] += READ_STATE(h[s], s) * Cs[k][n];
                    }
                    if ((k + 1) % KEEP_EVERY == 0) keep_checkpoint(checkpoint, h, t0 + k + 1, length, channels, keeps);
                }
                sum_steps_over_lanes<1>(y);
                __syncwarp();  // the channel's lanes have read dt u before they overwrite it
                steps[k0 + group][slot].y = y[0];
            }
        };
        if (t0 + TILE <= length) walk(Flag<true>());
        else walk(Flag<false>());
        __syncthreads();
        if (HAS_Z) store_outputs(out_z, out_z_sc, left, t0, length, steps, u_tile, z_tile, D_s);
        else store_outputs(out, out_sc, left, t0, length, steps, u_tile, z_tile, D_s);  // y itself the output
    }
}

// six blocks a multiprocessor (80 registers: fewer blocks with more measured slower at 16 states; at 22,
// four of 128 registers, 301.4 us against 253.3 at six, whose few spills cost less than a second wave of
// blocks: Vim-S's 768 at 22 states run at once)
extern "C" __global__ void __launch_bounds__(THREADS, 6)
scan_bwd(const in_t* __restrict__ u, const in_t* __restrict__ delta, const float* __restrict__ A,
         const bc_t* __restrict__ Bm, const bc_t* __restrict__ Cm, const float* __restrict__ Dskip,
         const in_t* __restrict__ z, const float* __restrict__ delta_bias, const float* __restrict__ offset,
         const in_t* __restrict__ dout, float* __restrict__ ckpt,
         in_t* __restrict__ du, in_t* __restrict__ ddelta, float* __restrict__ dA,
         float* __restrict__ dB, float* __restrict__ dC, float* __restrict__ dD, float* __restrict__ ddelta_bias,
         float* __restrict__ doffset,
         in_t* __restrict__ dz, in_t* __restrict__ out_z,
         int channels, int length, int states_given,
         int u_sb, int u_sc, int delta_sb, int delta_sc, int z_sb, int z_sc,
         int B_sb, int B_sn, int B_sl, int C_sb, int C_sn, int C_sl, int dout_sb, int dout_sc,
         int du_sb, int du_sc, int ddelta_sb, int ddelta_sc, int dz_sb, int dz_sc, int out_z_sb, int out_z_sc,
         int dB_sb, int dB_sn, int dB_sl, int dC_sb, int dC_sn, int dC_sl) {
    // in-dtype tiles: u's then takes du, delta's ddelta, z's dz, dout's y silu(z)
    __shared__ tile_t u_tile, delta_tile, z_tile, dout_tile;
    // per (step, channel): dt (then d loss / d dt), dt u, d loss / d y (zero past the last channel; with
    // z then y, recomputed from the states as the forward computed it instead of kept from the forward,
    // a (B, D, L) tensor per layer, for dz and out_z after the tile's steps), u; the walk reads all four
    // in one access
    __shared__ qtile_t steps;
    __shared__ float Bs[TILE][NPAD], Cs[TILE][NPAD];
    __shared__ chunk_states_t states;  // one chunk's, recomputed
    // per warp and step of a chunk: dB then dC, summed over the warp's channels (plain stores: a float
    // atomic add to shared memory is a compare-and-swap loop)
    __shared__ float sums[WARPS][CHUNK][SUMS_ROW];
    // per channel: delta_bias, and the block's sums of d loss / d D and d loss / d delta_bias
    __shared__ float bias_s[CHANNELS], column_sums[2][CHANNELS];
    KNOWN_BACKWARD_ARGS
    THREAD_SETUP
    channel_values(bias_s, delta_bias, HAS_BIAS, c0, channels);  // read and zeroed before the first barriers
    if ((int)threadIdx.x < CHANNELS) column_sums[0][threadIdx.x] = column_sums[1][threadIdx.x] = 0.f;
    const float D_c = HAS_D ? Dskip[c] : 0.f;
    // after a round's butterfly, lane l holds entry l / LANES of state group l % LANES: dB (entries < 4) or
    // dC of the group's state 4 round + entry % 4 (sum_slot + 4 round)
    const int warp = threadIdx.x / WARP, entry = threadIdx.x % WARP / LANES, sum_slot = entry % 4;
    const int sum_index = (entry < 4 ? 0 : NPAD) + group * OWN + sum_slot;
    // after a last round of two states (warp_channel_pair_sums), lane l holds entry (l / 8) % 4 of state
    // group l % LANES, as does lane l ^ 4 (the one of them with bit 2 clear stores it): dB (entries < 2)
    // or dC of the group's state 4 round + entry % 2
    const int pair_entry = threadIdx.x % WARP / 8, pair_slot = pair_entry % 2;
    const int pair_index = (pair_entry < 2 ? 0 : NPAD) + group * OWN + pair_slot;
    const bool pair_stores = !(threadIdx.x & 4);
    u = ROWS(u, u); delta = ROWS(delta, delta); z = ROWS(z, z); dout = ROWS(dout, dout);
    du = ROWS(du, du); ddelta = ROWS(ddelta, ddelta); dz = ROWS(dz, dz); out_z = ROWS(out_z, out_z);
    float* checkpoint = CHECKPOINTS(ckpt);
    // this thread's share of each chunk's dB and dC: states sum_state, + THREADS / CHUNK, ... (one at
    // N = 16) at step sum_step (a state's CHUNK steps per access)
    static_assert(THREADS % CHUNK == 0, "a thread's (state, step) pairs at one step");
    const int sum_step = threadIdx.x % CHUNK, sum_state = threadIdx.x / CHUNK;
    float* dB_row = dB + (long long)b * dB_sb + sum_state * dB_sn;
    float* dC_row = dC + (long long)b * dC_sb + sum_state * dC_sn;

    // forward, unless it ran with keep_states: the checkpoints
    in_t u_next[TILE_ROWS], delta_next[TILE_ROWS];
    bc_t B_next[STATE_ROWS];
    fetch(u_next, u, u_sc, left, 0, length);
    fetch(delta_next, delta, delta_sc, left, 0, length);
    fetch_states(B_next, Bm, B_sn, B_sl, 0, length);
    for (int t0 = 0; !states_given && t0 + KEEP_EVERY < length; t0 += TILE) {
        __syncthreads();
        put_step_sizes(steps, u_next, delta_next, bias_s); put_states(Bs, B_next, B_sn);
        __syncthreads();
        fetch(u_next, u, u_sc, left, t0 + TILE, length);
        fetch(delta_next, delta, delta_sc, left, t0 + TILE, length);
        fetch_states(B_next, Bm, B_sn, B_sl, t0 + TILE, length);
#pragma unroll
        for (int k = 0; k < TILE; ++k) {
            if (t0 + k >= length) break;
            advance(h, steps, Bs, A2, k, slot, group);
            if ((k + 1) % KEEP_EVERY == 0) keep_checkpoint(checkpoint, h, t0 + k + 1, length, channels, slot < left);
        }
    }

    // backward, from the last tile and chunk. carried: exp(dt A) g of the step after the one being walked,
    // g (d loss / d state) as it reaches the state before that step
    float carried[OWN], dA_c[OWN], doff[OWN];  // doff: d loss / d h', over the channel's steps
#pragma unroll
    for (int s = 0; s < OWN; ++s) { carried[s] = 0.f; dA_c[s] = 0.f; doff[s] = 0.f; }
    const int last = (length - 1) / TILE * TILE;
    for (int t0 = last; t0 >= 0; t0 -= TILE) {
        // the tile's inputs, read here and not a tile ahead: held through the tile, they were spilled
        // right after the reads (80 registers at 16 states), the spill stores waiting for them (this alone:
        // 208.4 -> 199.7 us at Vim-S's shape, one H200); in flight while the block waits at the barrier
        in_t u_in[TILE_ROWS], delta_in[TILE_ROWS], dout_in[TILE_ROWS], z_in[TILE_ROWS];
        bc_t B_in[STATE_ROWS], C_in[STATE_ROWS];
        fetch(u_in, u, u_sc, left, t0, length);
        fetch(delta_in, delta, delta_sc, left, t0, length);
        fetch(dout_in, dout, dout_sc, left, t0, length);
        if (HAS_Z) fetch(z_in, z, z_sc, left, t0, length);
        fetch_states(B_in, Bm, B_sn, B_sl, t0, length);
        fetch_states(C_in, Cm, C_sn, C_sl, t0, length);
        __syncthreads();  // the last tile's gradients are stored
        put_states(Bs, B_in, B_sn); put_states(Cs, C_in, C_sn);
        put(delta_tile, delta_in); put(dout_tile, dout_in);
        if (HAS_Z) put(z_tile, z_in);
        step_inputs(steps, column_sums[0], u_in, delta_in, dout_in, z_in, bias_s);
        __syncthreads();
#pragma unroll
        for (int first = TILE - CHUNK; first >= 0; first -= CHUNK) {  // the tile's chunks, from the last
            const int s0 = t0 + first;
            if (s0 >= length) continue;
            // the state before the chunk, read here and not for the whole tile at its start: a tile's
            // chunks' held through it took OWN registers a chunk (at Vim-S's shape, one H200, graph-timed:
            // the backward 187.8 -> 177.7 us at 16 states; at 22, six blocks a multiprocessor at 80
            // registers then spill 28 bytes a thread, not 132)
            float start[OWN];
            const int ahead = first % KEEP_EVERY, kept_at = s0 - ahead;  // the checkpoint at or before the chunk
#pragma unroll
            for (int s = 0; s < OWN; ++s)
                start[s] = kept_at > 0 ? checkpoint[((long long)(kept_at / KEEP_EVERY) * NPAD + s) * channels] : 0.f;
            // from there to the chunk (past 16 states: a chunk of 4 steps, a checkpoint every 8), as the
            // forward computed them
#pragma unroll
            for (int k = first - ahead; k < first; ++k) advance(start, steps, Bs, A2, k, slot, group);
            auto walk = [&](auto full) {  // the chunk's states, then back through them; full: as above
#pragma unroll
                for (int s = 0; s < OWN; ++s) h[s] = start[s];
#pragma unroll
                for (int j = 0; j < CHUNK; ++j) {  // the chunk's states (steps past the end leave them as they are)
                    const int k = first + j;
                    if (decltype(full)::value || s0 + j < length) {
                        advance(h, steps, Bs, A2, k, slot, group);
                        keep_state(states, j, h);
                    }
                }
                // back through the chunk's steps, four at a time: each step's sums over the channel's states
                // (d loss / d dt, the sum of g B, y) summed over its lanes at once, each lane left one step's,
                // which it stores (5% of the backward at Vim-S, with the float4 tile above). Past four states a
                // lane too, though four steps' sums then spill a few registers: one step at a time was slower
                // (graph-timed at Vim-S's shape, one H200: 17 states 230.0 -> 224.4 us with four, 22 states
                // 252.5 -> 245.4)
                static_assert(CHUNK % LANES == 0 && PER_STEP <= LANES, "whole groups of steps; a sum a lane");
                // the state after the step being walked: the chunk's last (or the sequence's), then each
                // step's state before, read for the step's A and dt gradients, passed on
                float st[OWN];
                kept_state(st, states, decltype(full)::value ? CHUNK - 1 : min(CHUNK - 1, length - 1 - s0));
#pragma unroll
                for (int j_hi = CHUNK - 1; j_hi >= 0; j_hi -= LANES) {
                    float q[LANES * PER_STEP];  // step i's sums at i PER_STEP
#pragma unroll
                    for (int p = 0; p < LANES * PER_STEP; ++p) q[p] = 0.f;
#pragma unroll
                    for (int i = 0; i < LANES; ++i) {
                        const int j = j_hi - i, k = first + j;
                        if (!decltype(full)::value && s0 + j >= length) continue;
                        const float4 in = steps[k][slot];
                        const float dt = in.x, dtu = in.y, dy = in.z, u_t = in.w;
                        float terms[2 * OWN], gB = 0.f, gAh = 0.f, y = 0.f;
                        float before[OWN];  // the state before the step: kept for step j - 1, or the chunk's start
                        if (j > 0) kept_state(before, states, j - 1);
                        else {
#pragma unroll
                            for (int s = 0; s < OWN; ++s) before[s] = start[s];
                        }
                        // g exp(dt A) h_before, what dt's and A's gradients both take, from the state before
                        // (not as g (h - B dt u): one FFMA a state fewer, no cancellation; at Vim-S's shape,
                        // one H200, graph-timed against the kernel before: 192.4 -> 189.7 us, reverse 193.6 ->
                        // 191.5; 22 states 326.5 -> 319.5, 342.9 -> 328.1)
#pragma unroll
                        for (int s = 0; s < OWN; ++s) {
                            const int n = group * OWN + s;
                            const float g = carried[s] + Cs[k][n] * dy;
                            const float state = st[s];
                            if (HAS_Z) y += READ_STATE(state, s) * Cs[k][n];  // as the forward sums it
                            if (HAS_OFFSET) doff[s] += Cs[k][n] * dy;
                            gB += g * Bs[k][n];
                            carried[s] = g * exp2f(dt * A2[s]);
                            const float g_decayed = carried[s] * before[s];
                            gAh += g_decayed * A2[s];
                            if (WANTS_DA) dA_c[s] += g_decayed * dt;
                            terms[s] = g * dtu;           // dB
                            terms[OWN + s] = READ_STATE(state, s) * dy;  // dC
                            st[s] = before[s];
                        }
                        q[i * PER_STEP] = gAh * LN2 + gB * u_t;  // d loss / d dt, this lane's states'
                        q[i * PER_STEP + 1] = gB;
                        if (HAS_Z) q[i * PER_STEP + PER_STEP - 1] = y;
#pragma unroll
                        for (int round = 0; round < ROUNDS; ++round) {  // four states of the lane's at a time
                            if (OWN - 4 * round <= 2) {  // a last round of one or two states: half the values
                                float v[4];
                                round_terms(v, terms, 4 * round);
                                const float sum = warp_channel_pair_sums(v);
                                if (pair_stores && pair_slot + 4 * round < OWN) sums[warp][j][pair_index + 4 * round] = sum;
                                continue;
                            }
                            float v[8];
                            round_terms(v, terms, 4 * round);
                            const float sum = warp_channel_sums(v);
                            if (sum_slot + 4 * round < OWN) sums[warp][j][sum_index + 4 * round] = sum;
                        }
                    }
                    sum_steps_over_lanes<PER_STEP>(q);
                    const int k = first + j_hi - group;  // this lane's step of the four
                    const float4 in = steps[k][slot];
                    __syncwarp();  // the channel's lanes have read its tiles before they overwrite them
                    steps[k][slot].x = q[0];  // d loss / d dt
                    u_tile[k][slot] = to_in(in.x * q[1] + D_c * in.z);
                    if (HAS_Z) steps[k][slot].z = q[PER_STEP - 1] + D_c * in.w;  // y
                }
            };
            if (s0 + CHUNK <= length) walk(Flag<true>());
            else walk(Flag<false>());
            __syncthreads();
            // the chunk's dB and dC: the block's warps' sums, one global atomic per (state, step)
            if (s0 + sum_step < length) {
                const int t = at(s0 + sum_step, length);
#pragma unroll
                for (int i = 0; i < SUM_PASSES; ++i) {
                    const int n = sum_state + i * (THREADS / CHUNK);
                    if (n >= NSTATE) break;
                    float dB_total = 0.f, dC_total = 0.f;
#pragma unroll
                    for (int w = 0; w < WARPS; ++w) {  // (the padding is the last states': n is n's slot)
                        dB_total += sums[w][sum_step][n];
                        dC_total += sums[w][sum_step][NPAD + n];
                    }
                    atomicAdd(dB_row + i * (THREADS / CHUNK) * dB_sn + t * dB_sl, dB_total);
                    atomicAdd(dC_row + i * (THREADS / CHUNK) * dC_sn + t * dC_sl, dC_total);
                }
            }
            __syncthreads();  // read before the next chunk's steps overwrite them
        }
        store_gradients(du, ddelta, dz, out_z, du_sc, ddelta_sc, dz_sc, out_z_sc, left, t0, length, steps, u_tile,
                        delta_tile, dout_tile, z_tile, column_sums[1], bias_s);
    }
    if (slot < left) {
#pragma unroll
        for (int s = 0; s < OWN; ++s) {
            if (!REAL_STATE(group, s)) continue;
            const int at = (c0 + slot) * NSTATE + group * OWN + s;
            if (WANTS_DA) atomicAdd(dA + at, A_LOG ? dA_c[s] * state_matrix(A[at]) : dA_c[s]);
            if (HAS_OFFSET) atomicAdd(doffset + at, doff[s]);
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < min(CHANNELS, left)) {
        if (HAS_D && WANTS_DD) atomicAdd(dD + c0 + threadIdx.x, column_sums[0][threadIdx.x]);
        if (HAS_BIAS && WANTS_DBIAS) atomicAdd(ddelta_bias + c0 + threadIdx.x, column_sums[1][threadIdx.x]);
    }
}
