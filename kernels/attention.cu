// attention.cu: fused attention (FlashAttention-2 algorithm), forward and backward, f32 and bf16,
// any head dim up to 256: kernels are compiled for tile widths D = 32, 64, 96, 128, 192, 256 and a
// head dim below the width is zero-padded in the shared tiles (padded columns add nothing to a
// score and are never stored). Shared-memory-tiled SIMT kernels with fp32 math; no T x S matrix is ever
// written to global memory. Layouts and masking rules: crates/tuna-kernels/src/ops/attention/mod.rs.
//
// Tiles are 32 rows (one key per lane in the forward, one query row per lane in the backward's
// score phase) and blocks are 8 warps. Shared tiles are f32 (bf16 is widened on load) and padded
// to D+1 floats per row where lanes read down a column, so those reads are free of bank conflicts.
#include "common.cuh"
#include "attention.cuh"

#define ATTN_TILE 32      // rows per tile: queries and keys alike
#define ATTN_WARPS 8      // warps per block (256 threads)
#define ATTN_RPW 4        // rows per warp: ATTN_TILE / ATTN_WARPS
static_assert(ATTN_RPW * ATTN_WARPS == ATTN_TILE, "each warp owns ATTN_RPW of the tile's rows");

// Copy 32 rows of `hd` elements (global row r at src[base + r*stride]) into shared dst, D columns
// with row pitch `pitch`, widening to f32; rows at or beyond `nvalid` and columns at or beyond
// `hd` are zero-filled (never garbage, since masked probabilities multiply them).
template <typename T, int D>
__device__ __forceinline__ void attn_load_tile(float* dst, int pitch, const T* src, long long base,
                                               long long stride, int nvalid, int hd) {
    for (int idx = threadIdx.x; idx < ATTN_TILE * D; idx += blockDim.x) {
        const int r = idx / D, d = idx % D;
        dst[r * pitch + d] = r < nvalid && d < hd ? ld(src, base + r * stride + d) : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (ceil(T/32), heads, batch), 256 threads. Warp w owns query rows w*4..w*4+3 of
// the block; lane j scores key j of the current tile; lane owns output columns lane + 32c.
// Shared: Qs[32][D], Ks[32][D+1], Vs[32][D].
template <typename T, int D>
__device__ void attn_fwd(const AttnParams p, const T* q, const T* k, const T* v, const T* pk,
                         const T* pv, const u32_t* prows, const u8_t* mask, const T* bias, T* o, float* lse) {
    constexpr int C = D / 32;
    TUNA_DYN_SMEM(float, smem);
    float* Qs = smem;
    float* Ks = Qs + ATTN_TILE * D;
    float* Vs = Ks + ATTN_TILE * (D + 1);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_TILE;
    int P, pstart;
    attn_prefix_range(p, prows, b, &pstart, &P);
    const int T_ = p.q_len, S = p.kv_len, off = S - T_;
    const long long SR = p.kv_cap ? p.kv_cap : S;  // key rows per sequence in k/v
    const int kvh = h / (p.heads / p.kv_heads), HD = p.head_dim;
    const long long qs = (long long)p.heads * HD, ks = (long long)p.kv_heads * HD;
    attn_load_tile<T, D>(Qs, D, q, ((long long)b * T_ + q0) * qs + (long long)h * HD, qs, min(ATTN_TILE, T_ - q0), HD);

    float m[ATTN_RPW], l[ATTN_RPW], acc[ATTN_RPW][C];
#pragma unroll
    for (int r = 0; r < ATTN_RPW; ++r) {
        m[r] = TUNA_NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = 0.f;
    }
    const float sl2 = p.scale * ATTN_LOG2E;  // scores in log2 units, so exp2f is the exponential
    const int q_last = min(q0 + ATTN_TILE, T_) - 1;
    const int s_end = p.causal ? min(S, off + q_last + 1) : S;  // content keys any row here sees
    const int n_pt = (P + ATTN_TILE - 1) / ATTN_TILE, n_ct = (s_end + ATTN_TILE - 1) / ATTN_TILE;

    for (int t = 0; t < n_pt + n_ct; ++t) {
        const bool pre = t < n_pt;
        const int k0 = (pre ? t : t - n_pt) * ATTN_TILE;
        const int nk = min(ATTN_TILE, (pre ? P : S) - k0);
        __syncthreads();  // the previous tile is no longer read
        if (pre) {
            const long long base = ((long long)(pstart + k0) * p.kv_heads + kvh) * HD;
            attn_load_tile<T, D>(Ks, D + 1, pk, base, ks, nk, HD);
            attn_load_tile<T, D>(Vs, D, pv, base, ks, nk, HD);
        } else {
            const long long base = (((long long)b * SR + k0) * p.kv_heads + kvh) * HD;
            attn_load_tile<T, D>(Ks, D + 1, k, base, ks, nk, HD);
            attn_load_tile<T, D>(Vs, D, v, base, ks, nk, HD);
        }
        __syncthreads();

        const int j = k0 + lane;
        const bool key_ok = lane < nk && (pre || !p.has_mask || mask[(long long)b * S + j] != 0);
        const int bcol = pre ? pstart + j : (int)p.prefix_len + j;  // this lane's bias column
        float s[ATTN_RPW];
#pragma unroll
        for (int r = 0; r < ATTN_RPW; ++r) s[r] = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            const float kd = Ks[lane * (D + 1) + d];
#pragma unroll
            for (int r = 0; r < ATTN_RPW; ++r) s[r] += Qs[(warp * ATTN_RPW + r) * D + d] * kd;
        }
        // online softmax; s[r] becomes the tile's unnormalized probability of key `lane`
#pragma unroll
        for (int r = 0; r < ATTN_RPW; ++r) {
            const int i = q0 + warp * ATTN_RPW + r;
            const bool ok = key_ok && i < T_ && (pre || !p.causal || j <= off + i);
            const float bb = ok && p.has_bias ? ld(bias, attn_bias_off(p, h, i, bcol)) * ATTN_LOG2E : 0.f;
            const float x = ok ? s[r] * sl2 + bb : TUNA_NEG_INF;
            const float mn = fmaxf(m[r], warp_max(x));
            const float mu = mn == TUNA_NEG_INF ? 0.f : mn;  // no key seen yet: avoid -inf - -inf
            const float pr = exp2f(x - mu);
            const float alpha = exp2f(m[r] - mu);
            l[r] = l[r] * alpha + warp_sum(pr);
            m[r] = mn;
#pragma unroll
            for (int c = 0; c < C; ++c) acc[r][c] *= alpha;
            s[r] = pr;
        }
#pragma unroll 4
        for (int jj = 0; jj < ATTN_TILE; ++jj) {
            float vv[C];
#pragma unroll
            for (int c = 0; c < C; ++c) vv[c] = Vs[jj * D + lane + 32 * c];
#pragma unroll
            for (int r = 0; r < ATTN_RPW; ++r) {
                const float pj = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int c = 0; c < C; ++c) acc[r][c] += pj * vv[c];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATTN_RPW; ++r) {
        const int i = q0 + warp * ATTN_RPW + r;
        if (i >= T_) continue;
        // a row that saw no key outputs zeros; a NaN sum (a NaN score) a NaN row
        const bool seen = l[r] > 0.f || l[r] != l[r];
        const float inv = seen ? 1.f / l[r] : 0.f;
        const long long ob = (((long long)b * T_ + i) * p.heads + h) * HD;
#pragma unroll
        for (int c = 0; c < C; ++c)
            if (lane + 32 * c < HD) st(o, ob + lane + 32 * c, acc[r][c] * inv);
        if (lane == 0)
            lse[((long long)b * p.heads + h) * T_ + i] = seen ? (m[r] + log2f(l[r])) / ATTN_LOG2E : TUNA_NEG_INF;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward preprocess: delta[b,h,i] = sum_d dO[b,i,h,d] * O[b,i,h,d]. One warp per (b,i,h) row.
template <typename T>
__device__ void attn_bwd_pre(const AttnParams p, const T* o, const T* d_o, float* delta) {
    const long long rows = (long long)p.batch * p.q_len * p.heads;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together
    const int lane = threadIdx.x & 31, D = p.head_dim;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += ld(o, row * D + d) * ld(d_o, row * D + d);
    s = warp_sum(s);
    const long long h = row % p.heads, bi = row / p.heads, i = bi % p.q_len, b = bi / p.q_len;
    if (lane == 0) delta[(b * p.heads + h) * p.q_len + i] = s;
}

// dq += dq_acc (the f32 scratch the main backward kernel accumulated atomically).
template <typename T>
__device__ void attn_dq_add(const u64_t n, const float* dq_acc, T* dq) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < n; i += (u64_t)gridDim.x * blockDim.x)
        acc(dq, i, dq_acc[i]);
}

#include "attention_bwd.cuh"

#define ATTN_EMIT_D(T, NAME, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) attention_fwd_d##D##_##NAME(                \
        const AttnParams p, const T* q, const T* k, const T* v, const T* pk, const T* pv,         \
        const u32_t* prows, const u8_t* mask, const T* bias, T* o, float* lse) {                  \
        attn_fwd<T, D>(p, q, k, v, pk, pv, prows, mask, bias, o, lse);                            \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) attention_bwd_d##D##_##NAME(                \
        const AttnParams p, const T* q, const T* k, const T* v, const T* pk, const T* pv,         \
        const u32_t* prows, const u8_t* mask, const T* bias, const T* d_o, const float* lse,      \
        const float* delta, float* dq_acc, T* dk, T* dv, float* dpk, float* dpv, float* dbias) {  \
        attn_bwd<T, D>(p, q, k, v, pk, pv, prows, mask, bias, d_o, lse, delta, dq_acc, dk, dv, dpk, dpv, \
                       dbias);                                                                    \
    }

#define ATTN_EMIT(T, NAME)                                                                        \
    ATTN_EMIT_D(T, NAME, 32)                                                                      \
    ATTN_EMIT_D(T, NAME, 64)                                                                      \
    ATTN_EMIT_D(T, NAME, 96)                                                                      \
    ATTN_EMIT_D(T, NAME, 128)                                                                     \
    ATTN_EMIT_D(T, NAME, 192)                                                                     \
    ATTN_EMIT_D(T, NAME, 256)                                                                     \
    extern "C" __global__ void attention_bwd_pre_##NAME(const AttnParams p, const T* o,          \
                                                        const T* d_o, float* delta) {             \
        attn_bwd_pre<T>(p, o, d_o, delta);                                                        \
    }                                                                                             \
    extern "C" __global__ void attention_dq_add_##NAME(const u64_t n, const float* dq_acc, T* dq) { \
        attn_dq_add<T>(n, dq_acc, dq);                                                            \
    }
ATTN_EMIT(float, f32)
ATTN_EMIT(bf16_t, bf16)
