// gelu.cu: GELU forward and backward, tanh approximation and exact erf (and ReLU), f32 and bf16.
#include "common.cuh"

struct GeluParams {
    u64_t n;
    u32_t kind;  // 0 = tanh, 1 = erf, 2 = relu
    u32_t _pad;
};

#define SQRT_2_OVER_PI 0.7978845608f
#define GELU_C 0.044715f
#define FRAC_1_SQRT_2PI 0.3989422804f

__device__ __forceinline__ float gelu_f(u32_t kind, float x) {
    if (kind == 0) return 0.5f * x * (1.f + tanhf(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
    if (kind == 2) return x > 0.f || x != x ? x : 0.f;  // NaN passes through, as PyTorch's
    return 0.5f * x * (1.f + erff(x * 0.7071067812f));
}
__device__ __forceinline__ float gelu_grad(u32_t kind, float x) {
    if (kind == 0) {
        float t = tanhf(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * SQRT_2_OVER_PI * (1.f + 3.f * GELU_C * x * x);
    }
    if (kind == 2) return x > 0.f ? 1.f : (x != x ? x : 0.f);
    return 0.5f * (1.f + erff(x * 0.7071067812f)) + x * expf(-0.5f * x * x) * FRAC_1_SQRT_2PI;
}

template <typename T>
__device__ void gelu_fwd(const GeluParams p, const T* x, T* y) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x)
        st(y, i, gelu_f(p.kind, ld(x, i)));
}
template <typename T>
__device__ void gelu_bwd(const GeluParams p, const T* x, const T* dy, T* dx) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x)
        acc(dx, i, ld(dy, i) * gelu_grad(p.kind, ld(x, i)));
}

#define EMIT(T, NAME)                                                                              \
    extern "C" __global__ void gelu_fwd_##NAME(const GeluParams p, const T* x, T* y) { gelu_fwd(p, x, y); } \
    extern "C" __global__ void gelu_bwd_##NAME(const GeluParams p, const T* x, const T* dy, T* dx) { gelu_bwd(p, x, dy, dx); }
EMIT(float, f32)
EMIT(bf16_t, bf16)
