// adamw.cu: fused AdamW step on f32 masters (PyTorch's decoupled weight decay), grid-stride.
#include "common.cuh"

struct AdamWKernelParams {
    u64_t n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bias_c1;  // 1 - beta1^step
    float bias_c2;  // 1 - beta2^step
    u32_t _pad;
};

extern "C" __global__ void adamw_step_f32(const AdamWKernelParams k, float* params, const float* grads, float* m, float* v) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < k.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float g = grads[i];
        float x = params[i];
        x -= k.lr * k.weight_decay * x;
        const float mi = k.beta1 * m[i] + (1.f - k.beta1) * g;
        const float vi = k.beta2 * v[i] + (1.f - k.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        x -= k.lr * (mi / k.bias_c1) / (sqrtf(vi / k.bias_c2) + k.eps);
        params[i] = x;
    }
}

// The same step with the moments stored in bf16 (half their memory), computed in f32 and stored
// back with stochastic rounding: round-to-nearest would freeze them (beta2 = 0.999 moves v by 0.1%,
// below bf16's half-ulp of ~0.2%). The draw is a counter-based hash of (seed, index, moment), so a
// step is reproducible and the CPU (src/ops/adamw/cpu.rs) draws the same bits.
__device__ __forceinline__ u32_t adamw_mix32(u32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}
__device__ __forceinline__ bf16_t adamw_bf16_sr(float f, u32_t seed, u64_t i, u32_t salt) {
    const u32_t bits = __float_as_uint(f);
    if ((bits & 0x7f800000U) == 0x7f800000U) return (bf16_t)(bits >> 16);  // inf, NaN: as they are
    const u32_t h = adamw_mix32(seed ^ adamw_mix32((u32_t)i ^ adamw_mix32((u32_t)(i >> 32) + salt)));
    return (bf16_t)((bits + (h & 0xffffU)) >> 16);
}

extern "C" __global__ void adamw_step_f32_bf16_moments(const AdamWKernelParams k, const u32_t seed, float* params,
                                                       const float* grads, bf16_t* m, bf16_t* v) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < k.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float g = grads[i];
        float x = params[i];
        x -= k.lr * k.weight_decay * x;
        const float mi = k.beta1 * bf16_to_f32(m[i]) + (1.f - k.beta1) * g;
        const float vi = k.beta2 * bf16_to_f32(v[i]) + (1.f - k.beta2) * g * g;
        m[i] = adamw_bf16_sr(mi, seed, i, 0x6d6dU);
        v[i] = adamw_bf16_sr(vi, seed, i, 0x7676U);
        // The update uses the f32 moments of this step (what was rounded is only what is kept).
        x -= k.lr * (mi / k.bias_c1) / (sqrtf(vi / k.bias_c2) + k.eps);
        params[i] = x;
    }
}
