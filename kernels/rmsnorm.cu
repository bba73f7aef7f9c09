// rmsnorm.cu: RMSNorm over the last dim (Llama), forward and backward, f32 and bf16 (fp32 math).
//   fwd: rstd = 1/sqrt(sum(x^2)/D + eps), y = x*rstd*gamma
//   bwd: xhat = x*rstd, g = dy*gamma, dx += rstd * (g - xhat * mean(g*xhat)); dgamma += sum_rows dy*xhat
// Symbols: rmsnorm_{fwd,bwd}_{warp,block}_<T> and add_rmsnorm_fwd_{warp,block}_<T> (row kernels,
// see norm.cuh; the add variant writes h = x + r and normalizes it), rmsnorm_bwd_params_<T>
// (per-chunk partials of dgamma) and rmsnorm_bwd_reduce_f32 (partials into dgamma).
#include "common.cuh"
#include "norm.cuh"

struct RmsNormParams {
    u32_t rows;
    u32_t dim;
    float eps;
};

// The forward of one row `xr` whose threads' partial sums of squares `s` are already taken (the
// caller's first pass): rstd, then y from a second pass over xr.
template <typename T, bool WARP>
__device__ __forceinline__ void rmsnorm_row(const RmsNormParams p, const NormLane l, const T* xr, float s,
                                            const T* gamma, T* yr, float* rstd, float* scratch) {
    const float rs = 1.f / sqrtf(norm_row_sum<WARP>(s, scratch) / (float)p.dim + p.eps);
    for (u32_t i = l.t; i < p.dim; i += l.stride) st(yr, i, ld(xr, i) * rs * ld(gamma, i));
    if (l.t == 0) rstd[l.row] = rs;
}

template <typename T, bool WARP>
__device__ void rmsnorm_fwd(const RmsNormParams p, const T* x, const T* gamma, T* y, float* rstd) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;  // uniform across the warp (WARP) or the block
    const T* xr = x + l.row * p.dim;
    float s = 0.f;
    for (u32_t i = l.t; i < p.dim; i += l.stride) {
        const float v = ld(xr, i);
        s += v * v;
    }
    rmsnorm_row<T, WARP>(p, l, xr, s, gamma, y + l.row * p.dim, rstd, scratch);
}

// h = x + r, then the forward of h: bitwise add_fwd then rmsnorm_fwd (see norm_add_row).
template <typename T, bool WARP>
__device__ void add_rmsnorm_fwd(const RmsNormParams p, const T* x, const T* r, const T* gamma, T* h, T* y,
                                float* rstd) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;
    const u64_t off = l.row * p.dim;
    const float s = norm_add_row<T, true>(l, p.dim, x, r, h);
    rmsnorm_row<T, WARP>(p, l, h + off, s, gamma, y + off, rstd, scratch);
}

// dx only; dgamma comes from rmsnorm_bwd_params + rmsnorm_bwd_reduce.
template <typename T, bool WARP>
__device__ void rmsnorm_bwd(const RmsNormParams p, const T* x, const T* gamma, const float* rstd, const T* dy,
                            T* dx) {
    TUNA_SHARED(float, scratch, [32]);
    const NormLane l = norm_lane<WARP>();
    if (l.row >= p.rows) return;
    const u64_t off = l.row * p.dim;
    const float rs = rstd[l.row];
    float sgx = 0.f;
    for (u32_t i = l.t; i < p.dim; i += l.stride) sgx += ld(dy, off + i) * ld(gamma, i) * (ld(x, off + i) * rs);
    const float mgx = norm_row_sum<WARP>(sgx, scratch) / (float)p.dim;
    for (u32_t i = l.t; i < p.dim; i += l.stride) {
        const float g = ld(dy, off + i) * ld(gamma, i);
        acc(dx, off + i, rs * (g - (ld(x, off + i) * rs) * mgx));
    }
}

#define EMIT(T, NAME)                                                                                         \
    extern "C" __global__ void rmsnorm_fwd_warp_##NAME(const RmsNormParams p, const T* x, const T* gamma,    \
                                                       T* y, float* rstd) {                                   \
        rmsnorm_fwd<T, true>(p, x, gamma, y, rstd);                                                           \
    }                                                                                                         \
    extern "C" __global__ void rmsnorm_fwd_block_##NAME(const RmsNormParams p, const T* x, const T* gamma,   \
                                                        T* y, float* rstd) {                                  \
        rmsnorm_fwd<T, false>(p, x, gamma, y, rstd);                                                          \
    }                                                                                                         \
    extern "C" __global__ void add_rmsnorm_fwd_warp_##NAME(const RmsNormParams p, const T* x, const T* r,    \
                                                           const T* gamma, T* h, T* y, float* rstd) {         \
        add_rmsnorm_fwd<T, true>(p, x, r, gamma, h, y, rstd);                                                 \
    }                                                                                                         \
    extern "C" __global__ void add_rmsnorm_fwd_block_##NAME(const RmsNormParams p, const T* x, const T* r,   \
                                                            const T* gamma, T* h, T* y, float* rstd) {        \
        add_rmsnorm_fwd<T, false>(p, x, r, gamma, h, y, rstd);                                                \
    }                                                                                                         \
    extern "C" __global__ void rmsnorm_bwd_warp_##NAME(const RmsNormParams p, const T* x, const T* gamma,    \
                                                       const float* rstd, const T* dy, T* dx) {               \
        rmsnorm_bwd<T, true>(p, x, gamma, rstd, dy, dx);                                                      \
    }                                                                                                         \
    extern "C" __global__ void rmsnorm_bwd_block_##NAME(const RmsNormParams p, const T* x, const T* gamma,   \
                                                        const float* rstd, const T* dy, T* dx) {              \
        rmsnorm_bwd<T, false>(p, x, gamma, rstd, dy, dx);                                                     \
    }                                                                                                         \
    extern "C" __global__ void rmsnorm_bwd_params_##NAME(const RmsNormParams p, u32_t chunk_rows, const T* x, \
                                                         const float* rstd, const T* dy, float* part_g) {     \
        norm_param_partials<T, false>(p.rows, p.dim, chunk_rows, x, nullptr, rstd, dy, part_g, nullptr);      \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)

extern "C" __global__ void rmsnorm_bwd_reduce_f32(const RmsNormParams p, u32_t chunks, const float* part,
                                                  float* grad) {
    norm_param_reduce(p.dim, chunks, part, grad);
}
