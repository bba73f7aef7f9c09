// cross_entropy.cu: softmax cross-entropy with an ignore index, f32 and bf16 logits, f32 losses.
//
// One block per row. Pass 1 is an online (max, sum of exp) over the row: each thread keeps a
// running pair over its strided elements, then pairs are merged across the warp (shuffles) and the
// block (shared memory). fwd writes the loss; bwd (the fused forward + backward) also runs a write
// pass that overwrites the row of logits IN PLACE with grad_scale * (softmax - onehot), each
// element read and written by the same thread. blockDim is 256 or 1024 (chosen by vocab size),
// a multiple of 32.
#include "common.cuh"

struct CeParams {
    u32_t rows;
    u32_t vocab;
    int ignore_index;
    float grad_scale;
};

#define CE_NAN __int_as_float(0x7fc00000)

// Merge (m2, s2) into the running (m, s): s is a sum of exp(x - m).
// A side with m == -inf saw no element, or only -inf and NaN logits: its s is 0, or NaN from a
// NaN logit, and is added (not dropped) so that a NaN reaches the loss. Never exp(-inf - -inf).
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
    if (m2 == TUNA_NEG_INF) { s += s2; return; }
    if (m == TUNA_NEG_INF) { m = m2; s += s2; return; }
    const float mx = fmaxf(m, m2);
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void ms_warp(float& m, float& s) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ms_merge(m, s, m2, s2);
    }
}

// Max and sum of exp(x - max) over one row of `vocab`; every thread gets the result.
template <typename T>
__device__ void ce_row_stats(const T* x, u32_t vocab, float& M, float& S) {
    TUNA_SHARED(float, sm, [32]);
    TUNA_SHARED(float, ss, [32]);
    float m = TUNA_NEG_INF, s = 0.f;
    for (u32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = ld(x, i);
        if (v > m) {
            s = s * expf(m - v) + 1.f;  // m = -inf at first: expf(-inf) = 0
            m = v;
        } else if (v != TUNA_NEG_INF) {
            s += expf(v - m);  // also propagates a NaN logit
        }
    }
    ms_warp(m, s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    m = lane < nw ? sm[lane] : TUNA_NEG_INF;
    s = lane < nw ? ss[lane] : 0.f;
    ms_warp(m, s);
    M = m;
    S = s;
}

// Is target t a class index (not ignored, in range)? Writes the loss of other rows.
__device__ __forceinline__ bool ce_valid(const CeParams& p, int t, float* loss, u64_t r) {
    if (t != p.ignore_index && t >= 0 && (u32_t)t < p.vocab) return true;
    if (threadIdx.x == 0) loss[r] = t == p.ignore_index ? 0.f : CE_NAN;
    return false;
}

template <typename T>
__device__ void ce_fwd(const CeParams p, const T* logits, const int* targets, float* loss) {
    const u64_t r = blockIdx.x;
    const int t = targets[r];
    if (!ce_valid(p, t, loss, r)) return;  // uniform over the block: same t for every thread
    const T* x = logits + r * p.vocab;
    float M, S;
    ce_row_stats(x, p.vocab, M, S);
    if (threadIdx.x == 0) loss[r] = logf(S) + M - ld(x, t);
}

template <typename T>
__device__ void ce_fwd_bwd(const CeParams p, T* logits, const int* targets, float* loss) {
    const u64_t r = blockIdx.x;
    const int t = targets[r];
    T* x = logits + r * p.vocab;
    if (!ce_valid(p, t, loss, r)) {
        for (u32_t i = threadIdx.x; i < p.vocab; i += blockDim.x) st(x, i, 0.f);
        return;
    }
    // Read the target logit before ce_row_stats' __syncthreads: after it, the write pass of
    // another thread may overwrite x[t].
    const float xt = ld(x, t);
    float M, S;
    ce_row_stats(x, p.vocab, M, S);
    if (threadIdx.x == 0) loss[r] = logf(S) + M - xt;
    const float inv = 1.f / S;
    for (u32_t i = threadIdx.x; i < p.vocab; i += blockDim.x) {
        const float g = expf(ld(x, i) - M) * inv - (i == (u32_t)t ? 1.f : 0.f);
        st(x, i, p.grad_scale * g);
    }
}

#define EMIT(T, NAME)                                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        cross_entropy_fwd_##NAME(const CeParams p, const T* logits, const int* targets, float* loss) {      \
        ce_fwd(p, logits, targets, loss);                                                                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                                      \
        cross_entropy_bwd_##NAME(const CeParams p, T* logits, const int* targets, float* loss) {            \
        ce_fwd_bwd(p, logits, targets, loss);                                                               \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
