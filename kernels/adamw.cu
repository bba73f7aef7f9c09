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
