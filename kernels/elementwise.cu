// elementwise.cu: the glue ops of a transformer block, forward and backward, f32 and bf16:
// add, mul, scale, tanh (flat, grid-stride; tanh's backward reads the forward's output);
// add_bias (columns x rows grid; dbias from per-chunk partials and an in-order reduction, no
// atomics); slice_cols / concat_cols (one copy kernel);
// sum_rows_masked_mean (BERT mean pooling; each block counts its batch row's mask).
// Backwards accumulate (`+=`) into every gradient; forwards overwrite their outputs.
#include "common.cuh"

struct FlatParams {
    u64_t n;
    float s;  // scale's factor (1 elsewhere)
    u32_t _pad;
};
struct BiasParams {
    u64_t rows;
    u64_t cols;
};
struct ColsParams {
    u64_t rows;
    u64_t cols;  // of the wide tensor
    u64_t off;   // first column of the narrow tensor inside the wide one
    u64_t width; // columns of the narrow tensor
};
struct PoolParams {
    u64_t batch;
    u64_t seq;
    u64_t hidden;
};

// Rows per chunk of dbias partials handled by one (32 x BIAS_PART_ROWS) block.
#define BIAS_PART_COLS 32
#define BIAS_PART_ROWS 8

__device__ __forceinline__ u64_t gtid() { return blockIdx.x * (u64_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64_t gstride() { return (u64_t)gridDim.x * blockDim.x; }

// ---- flat ops ----
template <typename T>
__device__ void add_fwd(const FlatParams p, const T* a, const T* b, T* y) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) st(y, i, ld(a, i) + ld(b, i));
}
template <typename T>
__device__ void add_bwd(const FlatParams p, const T* dy, T* da, T* db) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) {
        const float g = ld(dy, i);
        acc(da, i, g);
        acc(db, i, g);
    }
}
template <typename T>
__device__ void mul_fwd(const FlatParams p, const T* a, const T* b, T* y) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) st(y, i, ld(a, i) * ld(b, i));
}
template <typename T>
__device__ void mul_bwd(const FlatParams p, const T* a, const T* b, const T* dy, T* da, T* db) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) {
        const float g = ld(dy, i);
        acc(da, i, g * ld(b, i));
        acc(db, i, g * ld(a, i));
    }
}
template <typename T>
__device__ void scale_fwd(const FlatParams p, const T* a, T* y) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) st(y, i, p.s * ld(a, i));
}
// Also dx += dy of add_bias (s = 1).
template <typename T>
__device__ void scale_bwd(const FlatParams p, const T* dy, T* da) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) acc(da, i, p.s * ld(dy, i));
}
template <typename T>
__device__ void tanh_fwd(const FlatParams p, const T* x, T* y) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) st(y, i, tanhf(ld(x, i)));
}
template <typename T>
__device__ void tanh_bwd(const FlatParams p, const T* y, const T* dy, T* dx) {
    for (u64_t i = gtid(); i < p.n; i += gstride()) {
        const float t = ld(y, i);
        acc(dx, i, ld(dy, i) * (1.f - t * t));
    }
}

// ---- add_bias: x over columns, y over rows (grid-stride: gridDim.y is capped at 65535) ----
// add_bias_inplace calls it with x = y: each element is read, then written, by one thread, so
// x and y must stay plain pointers (no __restrict__, and ld() must never become __ldg / ld.nc).
template <typename T>
__device__ void add_bias_fwd(const BiasParams p, const T* x, const T* bias, T* y) {
    const u64_t c = gtid();
    if (c >= p.cols) return;
    const float b = ld(bias, c);
    for (u64_t r = blockIdx.y; r < p.rows; r += gridDim.y) st(y, r * p.cols + c, ld(x, r * p.cols + c) + b);
}
// part[chunk, c] = sum of dy[r, c] over the chunk's rows, in a fixed order.
// Block (BIAS_PART_COLS, BIAS_PART_ROWS); grid (ceil(cols / BIAS_PART_COLS), chunks).
template <typename T>
__device__ void add_bias_bwd_partials(const BiasParams p, u64_t chunk_rows, const T* dy, float* part) {
    TUNA_SHARED(float, s, [BIAS_PART_ROWS][BIAS_PART_COLS + 1]);
    const u32_t tx = threadIdx.x, ty = threadIdx.y;
    const u64_t c = (u64_t)blockIdx.x * BIAS_PART_COLS + tx;
    const u64_t r0 = (u64_t)blockIdx.y * chunk_rows;
    const u64_t r1 = r0 + chunk_rows < p.rows ? r0 + chunk_rows : p.rows;
    float g = 0.f;
    if (c < p.cols)
        for (u64_t r = r0 + ty; r < r1; r += BIAS_PART_ROWS) g += ld(dy, r * p.cols + c);
    s[ty][tx] = g;
    __syncthreads();
    if (ty == 0 && c < p.cols) {
        for (int k = 1; k < BIAS_PART_ROWS; ++k) g += s[k][tx];
        part[(u64_t)blockIdx.y * p.cols + c] = g;
    }
}
// One thread per column: dbias[c] += sum over chunks (in order) of part[chunk, c].
extern "C" __global__ void add_bias_bwd_reduce_f32(const BiasParams p, u32_t chunks, const float* part, float* dbias) {
    const u64_t c = gtid();
    if (c >= p.cols) return;
    float s = 0.f;
    for (u32_t k = 0; k < chunks; ++k) s += part[(u64_t)k * p.cols + c];
    dbias[c] += s;
}

// ---- columns: dst[r, dst_off + c] (= or +=) src[r, src_off + c] for c < width ----
// x over the narrow columns, y over rows (grid-stride).
template <typename T, bool ACC>
__device__ void cols_copy(u64_t rows, u64_t width, const T* src, u64_t src_cols, u64_t src_off, T* dst,
                          u64_t dst_cols, u64_t dst_off) {
    const u64_t c = gtid();
    if (c >= width) return;
    for (u64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const float v = ld(src, r * src_cols + src_off + c);
        if (ACC) acc(dst, r * dst_cols + dst_off + c, v);
        else st(dst, r * dst_cols + dst_off + c, v);
    }
}

// ---- sum_rows_masked_mean: y over batch rows (grid-stride); every block counts its row's mask ----
__device__ __forceinline__ float mask_count(const u8_t* m, u64_t seq, float* scratch) {
    float n = 0.f;
    for (u64_t t = threadIdx.x; t < seq; t += blockDim.x) n += (float)m[t];
    return fmaxf(1.f, block_sum(n, scratch));
}
// x over hidden columns: each thread sums its column over the sequence.
template <typename T>
__device__ void masked_mean_fwd(const PoolParams p, const T* x, const u8_t* mask, T* y) {
    TUNA_SHARED(float, scratch, [32]);
    const u64_t h = gtid();
    for (u64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
        const u8_t* m = mask + b * p.seq;
        const float n = mask_count(m, p.seq, scratch);  // every thread of the block takes part
        if (h < p.hidden) {
            float s = 0.f;
            for (u64_t t = 0; t < p.seq; ++t) {
                const float w = (float)m[t];
                if (w != 0.f) s += w * ld(x, (b * p.seq + t) * p.hidden + h);
            }
            st(y, b * p.hidden + h, s / n);
        }
    }
}
// x over the seq*hidden elements of a batch row (grid-stride).
template <typename T>
__device__ void masked_mean_bwd(const PoolParams p, const u8_t* mask, const T* dy, T* dx) {
    TUNA_SHARED(float, scratch, [32]);
    const u64_t per = p.seq * p.hidden;
    for (u64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
        const u8_t* m = mask + b * p.seq;
        const float n = mask_count(m, p.seq, scratch);
        for (u64_t i = gtid(); i < per; i += gstride()) {
            const u64_t t = i / p.hidden;
            const float w = (float)m[t];
            if (w != 0.f) acc(dx, b * per + i, (w / n) * ld(dy, b * p.hidden + (i - t * p.hidden)));
        }
    }
}

#define EMIT(T, NAME)                                                                                          \
    extern "C" __global__ void add_fwd_##NAME(const FlatParams p, const T* a, const T* b, T* y) {              \
        add_fwd(p, a, b, y);                                                                                   \
    }                                                                                                          \
    extern "C" __global__ void add_bwd_##NAME(const FlatParams p, const T* dy, T* da, T* db) {                 \
        add_bwd(p, dy, da, db);                                                                                \
    }                                                                                                          \
    extern "C" __global__ void mul_fwd_##NAME(const FlatParams p, const T* a, const T* b, T* y) {              \
        mul_fwd(p, a, b, y);                                                                                   \
    }                                                                                                          \
    extern "C" __global__ void mul_bwd_##NAME(const FlatParams p, const T* a, const T* b, const T* dy, T* da,  \
                                              T* db) {                                                         \
        mul_bwd(p, a, b, dy, da, db);                                                                          \
    }                                                                                                          \
    extern "C" __global__ void scale_fwd_##NAME(const FlatParams p, const T* a, T* y) { scale_fwd(p, a, y); }  \
    extern "C" __global__ void scale_bwd_##NAME(const FlatParams p, const T* dy, T* da) {                      \
        scale_bwd(p, dy, da);                                                                                  \
    }                                                                                                          \
    extern "C" __global__ void tanh_fwd_##NAME(const FlatParams p, const T* x, T* y) { tanh_fwd(p, x, y); }    \
    extern "C" __global__ void tanh_bwd_##NAME(const FlatParams p, const T* y, const T* dy, T* dx) {           \
        tanh_bwd(p, y, dy, dx);                                                                                \
    }                                                                                                          \
    extern "C" __global__ void add_bias_fwd_##NAME(const BiasParams p, const T* x, const T* bias, T* y) {      \
        add_bias_fwd(p, x, bias, y);                                                                           \
    }                                                                                                          \
    /* y += bias in place: add_bias_fwd with x = y (each thread reads, then writes, its own) */               \
    extern "C" __global__ void add_bias_inplace_##NAME(const BiasParams p, const T* bias, T* y) {              \
        add_bias_fwd(p, y, bias, y);                                                                           \
    }                                                                                                          \
    extern "C" __global__ void add_bias_bwd_partials_##NAME(const BiasParams p, u64_t chunk_rows, const T* dy, \
                                                            float* part) {                                     \
        add_bias_bwd_partials(p, chunk_rows, dy, part);                                                        \
    }                                                                                                          \
    extern "C" __global__ void slice_cols_fwd_##NAME(const ColsParams p, const T* x, T* y) {                   \
        cols_copy<T, false>(p.rows, p.width, x, p.cols, p.off, y, p.width, 0);                                 \
    }                                                                                                          \
    extern "C" __global__ void slice_cols_bwd_##NAME(const ColsParams p, const T* dy, T* dx) {                 \
        cols_copy<T, true>(p.rows, p.width, dy, p.width, 0, dx, p.cols, p.off);                                \
    }                                                                                                          \
    extern "C" __global__ void concat_cols_fwd_##NAME(const ColsParams p, const T* x, T* y) {                  \
        cols_copy<T, false>(p.rows, p.width, x, p.width, 0, y, p.cols, p.off);                                 \
    }                                                                                                          \
    extern "C" __global__ void concat_cols_bwd_##NAME(const ColsParams p, const T* dy, T* dx) {                \
        cols_copy<T, true>(p.rows, p.width, dy, p.cols, p.off, dx, p.width, 0);                                \
    }                                                                                                          \
    extern "C" __global__ void sum_rows_masked_mean_fwd_##NAME(const PoolParams p, const T* x, const u8_t* mask, \
                                                               T* y) {                                         \
        masked_mean_fwd(p, x, mask, y);                                                                        \
    }                                                                                                          \
    extern "C" __global__ void sum_rows_masked_mean_bwd_##NAME(const PoolParams p, const u8_t* mask,           \
                                                               const T* dy, T* dx) {                           \
        masked_mean_bwd(p, mask, dy, dx);                                                                      \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
