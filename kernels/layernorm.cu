// layernorm.cu: LayerNorm over the last dim, forward and backward, f32 and bf16 (fp32 math).
//   fwd: mean = sum(x)/D, rstd = 1/sqrt(sum((x-mean)^2)/D + eps), y = (x-mean)*rstd*gamma + beta
//   bwd: xhat = (x-mean)*rstd, g = dy*gamma,
//        dx += rstd * (g - mean(g) - xhat * mean(g*xhat)); dgamma += sum_rows dy*xhat; dbeta += sum_rows dy
// Symbols: layernorm_{fwd,bwd}_{warp,block}_<T> and add_layernorm_fwd_{warp,block}_<T> (row
// kernels, see norm.cuh; the add variant writes h = x + r and normalizes it), layernorm_bwd_params_<T>
// (per-chunk partials of dgamma/dbeta) and layernorm_bwd_reduce_f32 (partials into dgamma/dbeta).
#include "common.cuh"
#include "norm.cuh"

struct LayerNormParams {
    u32_t rows;
    u32_t dim;
    float eps;
};

// The forward of one row `xr` whose threads' partial sums `s` of the row are already taken (the
// caller's first pass): the mean, then the variance and y from second and third passes over xr.
template <typename T, bool WARP>
__device__ __forceinline__ void layernorm_row(const LayerNormParams p, const NormLane l, const T* xr, float s,
                                              const T* gamma, const T* beta, T* yr, float* mean, float* rstd,
                                              float* scratch) {
    const float mu = norm_row_sum<WARP>(s, scratch) / (float)p.dim;
    float v = 0.f;
    for (u32_t i = l.t; i < p.dim; i += l.stride) {
        const float d = ld(xr, i) - mu;
        v += d * d;
    }
    const float rs = 1.f / sqrtf(norm_row_sum<WARP>(v, scratch) / (float)p.dim + p.eps);
    for (u32_t i = l.t; i < p.dim; i += l.stride) st(yr, i, (ld(xr, i) - mu) * rs * ld(gamma, i) + ld(beta, i));
    if (l.t == 0) {
        mean[l.row] = mu;
        rstd[l.row] = rs;
    }
}

template <typename T, bool WARP>
__device__ void layernorm_fwd(const LayerNormParams p, const T* x, const T* gamma, const T* beta, T* y,
                              float* mean, float* rstd) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;  // uniform across the warp (WARP) or the block
    const T* xr = x + l.row * p.dim;
    float s = 0.f;
    for (u32_t i = l.t; i < p.dim; i += l.stride) s += ld(xr, i);
    layernorm_row<T, WARP>(p, l, xr, s, gamma, beta, y + l.row * p.dim, mean, rstd, scratch);
}

// h = x + r, then the forward of h: bitwise add_fwd then layernorm_fwd (see norm_add_row).
template <typename T, bool WARP>
__device__ void add_layernorm_fwd(const LayerNormParams p, const T* x, const T* r, const T* gamma, const T* beta,
                                  T* h, T* y, float* mean, float* rstd) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;
    const u64_t off = l.row * p.dim;
    const float s = norm_add_row<T, false>(l, p.dim, x, r, h);
    layernorm_row<T, WARP>(p, l, h + off, s, gamma, beta, y + off, mean, rstd, scratch);
}

// dx only; dgamma/dbeta come from layernorm_bwd_params + layernorm_bwd_reduce.
template <typename T, bool WARP>
__device__ void layernorm_bwd(const LayerNormParams p, const T* x, const T* gamma, const float* mean,
                              const float* rstd, const T* dy, T* dx) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;
    const u64_t off = l.row * p.dim;
    const float mu = mean[l.row], rs = rstd[l.row];
    float sg = 0.f, sgx = 0.f;
    for (u32_t i = l.t; i < p.dim; i += l.stride) {
        const float g = ld(dy, off + i) * ld(gamma, i);
        sg += g;
        sgx += g * ((ld(x, off + i) - mu) * rs);
    }
    const float mg = norm_row_sum<WARP>(sg, scratch) / (float)p.dim;
    const float mgx = norm_row_sum<WARP>(sgx, scratch) / (float)p.dim;
    for (u32_t i = l.t; i < p.dim; i += l.stride) {
        const float g = ld(dy, off + i) * ld(gamma, i);
        const float xh = (ld(x, off + i) - mu) * rs;
        acc(dx, off + i, rs * (g - mg - xh * mgx));
    }
}

#define EMIT(T, NAME)                                                                                          \
    extern "C" __global__ void layernorm_fwd_warp_##NAME(const LayerNormParams p, const T* x, const T* gamma, \
                                                         const T* beta, T* y, float* mean, float* rstd) {      \
        layernorm_fwd<T, true>(p, x, gamma, beta, y, mean, rstd);                                              \
    }                                                                                                          \
    extern "C" __global__ void layernorm_fwd_block_##NAME(const LayerNormParams p, const T* x, const T* gamma,\
                                                          const T* beta, T* y, float* mean, float* rstd) {     \
        layernorm_fwd<T, false>(p, x, gamma, beta, y, mean, rstd);                                             \
    }                                                                                                          \
    extern "C" __global__ void add_layernorm_fwd_warp_##NAME(const LayerNormParams p, const T* x, const T* r, \
                                                             const T* gamma, const T* beta, T* h, T* y,        \
                                                             float* mean, float* rstd) {                       \
        add_layernorm_fwd<T, true>(p, x, r, gamma, beta, h, y, mean, rstd);                                    \
    }                                                                                                          \
    extern "C" __global__ void add_layernorm_fwd_block_##NAME(const LayerNormParams p, const T* x, const T* r,\
                                                              const T* gamma, const T* beta, T* h, T* y,       \
                                                              float* mean, float* rstd) {                      \
        add_layernorm_fwd<T, false>(p, x, r, gamma, beta, h, y, mean, rstd);                                  \
    }                                                                                                          \
    extern "C" __global__ void layernorm_bwd_warp_##NAME(const LayerNormParams p, const T* x, const T* gamma, \
                                                         const float* mean, const float* rstd, const T* dy,    \
                                                         T* dx) {                                              \
        layernorm_bwd<T, true>(p, x, gamma, mean, rstd, dy, dx);                                               \
    }                                                                                                          \
    extern "C" __global__ void layernorm_bwd_block_##NAME(const LayerNormParams p, const T* x, const T* gamma,\
                                                          const float* mean, const float* rstd, const T* dy,   \
                                                          T* dx) {                                             \
        layernorm_bwd<T, false>(p, x, gamma, mean, rstd, dy, dx);                                              \
    }                                                                                                          \
    extern "C" __global__ void layernorm_bwd_params_##NAME(const LayerNormParams p, u32_t chunk_rows,          \
                                                           const T* x, const float* mean, const float* rstd,   \
                                                           const T* dy, float* part_g, float* part_b) {        \
        norm_param_partials<T, true>(p.rows, p.dim, chunk_rows, x, mean, rstd, dy, part_g, part_b);            \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)

extern "C" __global__ void layernorm_bwd_reduce_f32(const LayerNormParams p, u32_t chunks, const float* part,
                                                    float* grad) {
    norm_param_reduce(p.dim, chunks, part, grad);
}
