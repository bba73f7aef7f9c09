// swiglu.cu: SiLU and SwiGLU (Llama MLP), forward and backward, f32 and bf16 (fp32 math).
//   silu(x) = x * s, s = sigmoid(x);  silu'(x) = s * (1 + x * (1 - s))
//   silu:   y = silu(x);               dx += dy * silu'(x)
//   swiglu: y = silu(gate) * up;       dgate += dy * up * silu'(gate); dup += dy * silu(gate)
// One thread per element, grid-stride. Symbols: silu_{fwd,bwd}_<T>, swiglu_{fwd,bwd}_<T>.
#include "common.cuh"

struct SwigluParams {
    u64_t n;
};

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ void silu_fwd(const SwigluParams p, const T* x, T* y) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float v = ld(x, i);
        st(y, i, v * sigmoid_f(v));
    }
}
template <typename T>
__device__ void silu_bwd(const SwigluParams p, const T* x, const T* dy, T* dx) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float v = ld(x, i), s = sigmoid_f(v);
        acc(dx, i, ld(dy, i) * (s * (1.f + v * (1.f - s))));
    }
}
template <typename T>
__device__ void swiglu_fwd(const SwigluParams p, const T* gate, const T* up, T* y) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float g = ld(gate, i);
        st(y, i, g * sigmoid_f(g) * ld(up, i));
    }
}
template <typename T>
__device__ void swiglu_bwd(const SwigluParams p, const T* gate, const T* up, const T* dy, T* dgate, T* dup) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < p.n; i += (u64_t)gridDim.x * blockDim.x) {
        const float g = ld(gate, i), s = sigmoid_f(g), d = ld(dy, i);
        acc(dgate, i, d * ld(up, i) * (s * (1.f + g * (1.f - s))));
        acc(dup, i, d * (g * s));
    }
}

#define EMIT(T, NAME)                                                                                         \
    extern "C" __global__ void silu_fwd_##NAME(const SwigluParams p, const T* x, T* y) { silu_fwd(p, x, y); } \
    extern "C" __global__ void silu_bwd_##NAME(const SwigluParams p, const T* x, const T* dy, T* dx) {       \
        silu_bwd(p, x, dy, dx);                                                                               \
    }                                                                                                         \
    extern "C" __global__ void swiglu_fwd_##NAME(const SwigluParams p, const T* gate, const T* up, T* y) {   \
        swiglu_fwd(p, gate, up, y);                                                                           \
    }                                                                                                         \
    extern "C" __global__ void swiglu_bwd_##NAME(const SwigluParams p, const T* gate, const T* up,           \
                                                 const T* dy, T* dgate, T* dup) {                             \
        swiglu_bwd(p, gate, up, dy, dgate, dup);                                                              \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
