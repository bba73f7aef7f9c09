// grad.cu: gradient bookkeeping: scale-and-accumulate into f32, cast f32 -> T, squared norm
// (block reduction + one atomicAdd per block), clipping by a norm read on the device. Grid-stride.
#include "common.cuh"

struct GradParams {
    u64_t n;
    float scale;
    float max_norm;
};

__device__ __forceinline__ u64_t grad_first() { return blockIdx.x * (u64_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64_t grad_stride() { return (u64_t)gridDim.x * blockDim.x; }

template <typename T>
__device__ void grad_accumulate(const GradParams p, float* dst, const T* src) {
    for (u64_t i = grad_first(); i < p.n; i += grad_stride()) dst[i] += p.scale * ld(src, i);
}

template <typename T>
__device__ void grad_cast(const GradParams p, const float* src, T* dst) {
    for (u64_t i = grad_first(); i < p.n; i += grad_stride()) st(dst, i, src[i]);
}

extern "C" __global__ void grad_sqnorm_f32(const GradParams p, const float* src, float* acc) {
    TUNA_SHARED(float, scratch, [32]);
    float s = 0.f;
    for (u64_t i = grad_first(); i < p.n; i += grad_stride()) s += src[i] * src[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

extern "C" __global__ void grad_clip_f32(const GradParams p, const float* acc, float* dst) {
    // Same f32 arithmetic as clip_factor() in ops/grad/mod.rs; fminf(1, NaN) = 1.
    const float f = fminf(1.f, p.max_norm / (sqrtf(acc[0]) + 1e-6f));
    for (u64_t i = grad_first(); i < p.n; i += grad_stride()) dst[i] *= f;
}

#define EMIT(T, NAME)                                                                                \
    extern "C" __global__ void grad_accumulate_##NAME(const GradParams p, float* dst, const T* src) { \
        grad_accumulate(p, dst, src);                                                                \
    }                                                                                                \
    extern "C" __global__ void grad_cast_##NAME(const GradParams p, const float* src, T* dst) {       \
        grad_cast(p, src, dst);                                                                      \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
