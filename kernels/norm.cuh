// norm.cuh: device helpers shared by layernorm.cu and rmsnorm.cu (included by both, after
// common.cuh; each .cu is its own module, so nothing here is an extern "C" symbol).
//
// Row kernels come in two launch configurations, chosen by the launcher from `dim`:
//   WARP  = true : one warp per row, NORM_WARP_ROWS rows per block of 32 * NORM_WARP_ROWS threads
//                  (dim <= 1024: a lane handles at most 32 elements);
//   WARP  = false: one block per row, any blockDim.x that is a multiple of 32 (dim > 1024).
// Parameter gradients (dgamma, dbeta) are reduced over rows deterministically, with no atomics:
// norm_param_partials writes one partial sum per (chunk of rows, column) into a scratch buffer,
// then norm_param_reduce adds the partials of each column in chunk order into the f32 gradient.
#define NORM_WARP_ROWS 8
#define NORM_PART_COLS 32
#define NORM_PART_ROWS 8

// The row a thread works on, its first element in that row, and its stride along the row.
struct NormLane {
    u64_t row;
    u32_t t;
    u32_t stride;
};

template <bool WARP>
__device__ __forceinline__ NormLane norm_lane() {
    NormLane l;
    if constexpr (WARP) {
        l.row = (u64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        l.t = threadIdx.x & 31;
        l.stride = 32;
    } else {
        l.row = blockIdx.x;
        l.t = threadIdx.x;
        l.stride = blockDim.x;
    }
    return l;
}

// Sum over the threads of one row (the warp, or the block; every thread gets the result).
// Safe to call twice in a row: block_sum syncs before it rewrites `scratch`.
template <bool WARP>
__device__ __forceinline__ float norm_row_sum(float v, float* scratch) {
    if constexpr (WARP) {
        return warp_sum(v);
    } else {
        return block_sum(v, scratch);
    }
}

// The first pass of a fused residual add + norm over one row: h = x + r stored as T (as add_fwd
// stores it), returning this thread's partial sum of h (SQUARES: of h^2) read back from what it
// stored. A thread reads back only the elements of h it wrote itself (i = t, t + stride, ...,
// the same indices every later pass uses), so no barrier separates the add from the norm.
template <typename T, bool SQUARES>
__device__ __forceinline__ float norm_add_row(const NormLane l, u32_t dim, const T* x, const T* r, T* h) {
    const u64_t off = l.row * dim;
    float s = 0.f;
    for (u32_t i = l.t; i < dim; i += l.stride) {
        st(h, off + i, ld(x, off + i) + ld(r, off + i));
        const float v = ld(h, off + i);
        s += SQUARES ? v * v : v;
    }
    return s;
}

// Grid (ceil(dim / 32), chunks), block (32, 8). Block (cx, cy) sums rows
// [cy * chunk_rows, min((cy + 1) * chunk_rows, rows)) of columns [32 cx, 32 cx + 32):
//   part_g[cy, j] = sum_r dy[r, j] * xhat[r, j],  xhat = (x - mean[r]) * rstd[r]  (mean = 0 unless CENTERED)
//   part_b[cy, j] = sum_r dy[r, j]                                               (only if CENTERED)
// The order of every sum is fixed, so results are bitwise reproducible.
template <typename T, bool CENTERED>
__device__ void norm_param_partials(u64_t rows, u32_t dim, u32_t chunk_rows, const T* x, const float* mean,
                                    const float* rstd, const T* dy, float* part_g, float* part_b) {
    TUNA_SHARED(float, sg, [NORM_PART_ROWS][NORM_PART_COLS + 1]);
    TUNA_SHARED(float, sb, [NORM_PART_ROWS][NORM_PART_COLS + 1]);
    const u32_t tx = threadIdx.x, ty = threadIdx.y;
    const u32_t j = blockIdx.x * NORM_PART_COLS + tx;
    const u64_t r0 = (u64_t)blockIdx.y * chunk_rows;
    const u64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
    float g = 0.f, b = 0.f;
    if (j < dim) {
        for (u64_t r = r0 + ty; r < r1; r += NORM_PART_ROWS) {
            const float d = ld(dy, r * dim + j);
            const float m = CENTERED ? mean[r] : 0.f;
            g += d * ((ld(x, r * dim + j) - m) * rstd[r]);
            b += d;
        }
    }
    sg[ty][tx] = g;
    sb[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && j < dim) {
        for (int k = 1; k < NORM_PART_ROWS; ++k) {
            g += sg[k][tx];
            b += sb[k][tx];
        }
        part_g[(u64_t)blockIdx.y * dim + j] = g;
        if (CENTERED) part_b[(u64_t)blockIdx.y * dim + j] = b;
    }
}

// One thread per column: grad[j] += sum over chunks c (in order) of part[c, j].
__device__ __forceinline__ void norm_param_reduce(u32_t dim, u32_t chunks, const float* part, float* grad) {
    const u32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    float s = 0.f;
    for (u32_t c = 0; c < chunks; ++c) s += part[(u64_t)c * dim + j];
    grad[j] += s;
}
