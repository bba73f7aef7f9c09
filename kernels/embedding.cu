// embedding.cu: token embedding lookup with soft-prompt injection, forward and backward, f32 and bf16.
//
// fwd: one block per output row (b, t), threads stride over hidden; the row is a raw copy.
// bwd_table: one block per token, atomicAdd of its d_out row into d_table[id] (f32). Atomic
//   adds make the summation order, and so the last bits, vary from run to run.
// bwd_prompt: grid (n_prompt, hidden / block), one thread per (k, column), summing over the batch
//   in order (deterministic, no atomics).
// Ids are validated on the host before upload; an id >= vocab that still arrives gives a zero
// output row and no gradient, and an `at` beyond seq is clamped, so nothing is read out of bounds.
#include "common.cuh"

struct EmbedParams {
    u32_t batch;
    u32_t seq;
    u32_t vocab;
    u32_t hidden;
    u32_t n_prompt;
    u32_t _pad;
};

// Insertion point of row b (0 without a prompt; clamped to seq).
__device__ __forceinline__ u32_t embed_at(const EmbedParams& p, const u32_t* at, u32_t b) {
    return p.n_prompt ? min(at[b], p.seq) : 0u;
}

template <typename T>
__device__ void embed_fwd(const EmbedParams p, const T* table, const u32_t* ids, const T* prompt, const u32_t* at, T* out) {
    const u32_t len = p.seq + p.n_prompt;
    const u64_t r = blockIdx.x;
    const u32_t b = (u32_t)(r / len), t = (u32_t)(r % len);
    const u32_t a = embed_at(p, at, b);
    const T* src = nullptr;
    if (t >= a && t < a + p.n_prompt) {
        src = prompt + (u64_t)(t - a) * p.hidden;
    } else {
        const u32_t j = t < a ? t : t - p.n_prompt;
        const u32_t id = ids[(u64_t)b * p.seq + j];
        if (id < p.vocab) src = table + (u64_t)id * p.hidden;
    }
    T* dst = out + r * p.hidden;
    for (u32_t i = threadIdx.x; i < p.hidden; i += blockDim.x) dst[i] = src ? src[i] : (T)0;
}

template <typename T>
__device__ void embed_bwd_table(const EmbedParams p, const u32_t* ids, const u32_t* at, const T* d_out, float* d_table) {
    const u64_t i = blockIdx.x;
    const u32_t b = (u32_t)(i / p.seq), j = (u32_t)(i % p.seq);
    const u32_t id = ids[i];
    if (id >= p.vocab) return;
    const u32_t a = embed_at(p, at, b);
    const u32_t t = j < a ? j : j + p.n_prompt;
    const T* g = d_out + ((u64_t)b * (p.seq + p.n_prompt) + t) * p.hidden;
    float* dst = d_table + (u64_t)id * p.hidden;
    for (u32_t k = threadIdx.x; k < p.hidden; k += blockDim.x) atomicAdd(dst + k, ld(g, k));
}

template <typename T>
__device__ void embed_bwd_prompt(const EmbedParams p, const u32_t* at, const T* d_out, float* d_prompt) {
    const u32_t k = blockIdx.x;
    const u32_t col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= p.hidden) return;
    const u32_t len = p.seq + p.n_prompt;
    float s = 0.f;
    for (u32_t b = 0; b < p.batch; b++) {
        const u32_t t = embed_at(p, at, b) + k;
        s += ld(d_out, ((u64_t)b * len + t) * p.hidden + col);
    }
    d_prompt[(u64_t)k * p.hidden + col] += s;
}

#define EMIT(T, NAME)                                                                                        \
    extern "C" __global__ void embedding_fwd_##NAME(const EmbedParams p, const T* table, const u32_t* ids,    \
                                                    const T* prompt, const u32_t* at, T* out) {              \
        embed_fwd(p, table, ids, prompt, at, out);                                                           \
    }                                                                                                        \
    extern "C" __global__ void embedding_bwd_table_##NAME(const EmbedParams p, const u32_t* ids,             \
                                                          const u32_t* at, const T* d_out, float* d_table) { \
        embed_bwd_table(p, ids, at, d_out, d_table);                                                         \
    }                                                                                                        \
    extern "C" __global__ void embedding_bwd_prompt_##NAME(const EmbedParams p, const u32_t* at,             \
                                                           const T* d_out, float* d_prompt) {                \
        embed_bwd_prompt(p, at, d_out, d_prompt);                                                            \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
