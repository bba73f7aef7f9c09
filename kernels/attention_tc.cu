// attention_tc.cu: the tensor-core attention forward (FlashAttention-2 algorithm) for bf16 Q/K/V
// with head dims 32, 64 and 128, built from kernels/mma.cuh's primitives. Same parameters,
// layouts, masking rules and outputs as attention.cu's forward (o in bf16, lse in f32, natural
// log, -inf for a row that sees no key), so attention.cu's backward consumes its lse. Covered: the
// key padding mask, GQA, prefix keys/values from their own buffer (whole table or per-sequence
// ranges), the KV-cache offset, a strided KV cache (kv_cap) and the additive score bias (read from
// global memory per score). Not covered (the launcher keeps those calls on attention.cu, and the
// kernel traps if handed one): other head dims, buffers not 16-byte aligned.
//
// Block: 4 warps, 64 query rows (warp w owns rows 16w..16w+15), grid (ceil(T/64), heads, batch).
// Keys stream in tiles of 64: the prefix tiles of the sequence's range first, then content tiles up
// to the causal limit of the block's last row (later tiles are skipped; the crossing tile is masked
// per element). K/V tiles are copied by cp.async 16-byte chunks into two shared buffers (tile t+1
// is in flight while tile t is used); rows past the end of the keys are zero-filled by plain
// stores. Shared rows are padded from D to D+8 bf16 (a pitch of D*2+16 bytes, an odd number of
// 16-byte units), so the 8 row addresses of each ldmatrix 8x8 matrix fall in 8 different 16-byte
// bank groups: no bank conflicts, without a swizzle.
//
// Per tile and warp: S (16x64, f32, in registers: 8 m16n8 accumulators) = Q K^T by mma m16n8k16,
// the Q A-fragments loaded once by ldmatrix.x4, K B-fragments by ldmatrix.x4 (non-trans: K is
// stored key-major, which is B = K^T in "col" layout). Then masking, the online softmax in f32
// (log2 units, exp2f; each row's 64 scores are spread over the 4 lanes of a quad: max by two
// xor-shuffles, the running sum kept per lane and reduced at the end), and O += P V: the S
// accumulator of n8 tiles 2c and 2c+1 is exactly the A fragment of the k16 chunk c of P (C
// layout: c[0..1] = row g cols 2t..2t+1, c[2..3] = row g+8; A layout: a[0] = row g cols 2t..,
// a[1] = row g+8, a[2] = row g cols 8+2t.., a[3] = row g+8 cols 8+2t..), so P is packed to bf16
// pairs in registers, never through shared memory; V B-fragments by ldmatrix.x4.trans (V is stored
// key-major, B = V is k-major). The row sum l adds the bf16-rounded probabilities that the mma
// multiplies, so the normalization matches the weights used.
#include "common.cuh"
#include "mma.cuh"
#include "attention.cuh"

#define TC_ROWS 64   // query rows per block (4 warps x 16)
#define TC_KEYS 64   // keys per tile
#define TC_THREADS 128
#define TC_PAD 8     // bf16 of padding per shared row

// The unit of dynamic shared memory: 16 bytes, so the buffers start 16-byte aligned.
struct alignas(16) TcChunk {
    u32_t w[4];
};

// Two floats as a bf16 pair (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32_t tc_pack_bf16(float lo, float hi) {
    return (u32_t)f32_to_bf16(lo) | ((u32_t)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ float tc_lo(u32_t x) { return bf16_to_f32((bf16_t)(x & 0xffffu)); }
__device__ __forceinline__ float tc_hi(u32_t x) { return bf16_to_f32((bf16_t)(x >> 16)); }

// 64 rows of D bf16 (global row r at src + r * stride, 16-byte aligned) into shared dst (pitch
// D + TC_PAD) by cp.async; rows nvalid.. are zero-filled (their probabilities are 0, but 0 * NaN
// garbage would not be).
template <int D>
__device__ __forceinline__ void tc_load_rows(bf16_t* dst, const bf16_t* src, long long stride, int nvalid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int LD = D + TC_PAD;
    static_assert((TC_ROWS * CPR) % TC_THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < TC_ROWS * CPR / TC_THREADS; ++i) {
        const int idx = threadIdx.x + i * TC_THREADS, r = idx / CPR, c = (idx % CPR) * 8;
        bf16_t* d = dst + r * LD + c;
        if (r < nvalid)
            cp_async_16(d, src + r * stride + c);
        else
            *reinterpret_cast<TcChunk*>(d) = TcChunk{{0u, 0u, 0u, 0u}};
    }
}

// Key tile `tile` (prefix tiles first) of sequence b, KV head kvh, into Kd / Vd.
template <int D>
__device__ __forceinline__ void tc_load_kv(const AttnParams& p, bf16_t* Kd, bf16_t* Vd, const bf16_t* k,
                                           const bf16_t* v, const bf16_t* pk, const bf16_t* pv, int tile, int n_pt,
                                           int P, int pstart, long long SR, int b, int kvh) {
    const bool pre = tile < n_pt;
    const int k0 = (pre ? tile : tile - n_pt) * TC_KEYS;
    const int nk = min(TC_KEYS, (pre ? P : (int)p.kv_len) - k0);
    const long long ks = (long long)p.kv_heads * D;
    const long long base = pre ? ((long long)(pstart + k0) * p.kv_heads + kvh) * D
                               : (((long long)b * SR + k0) * p.kv_heads + kvh) * D;
    tc_load_rows<D>(Kd, (pre ? pk : k) + base, ks, nk);
    tc_load_rows<D>(Vd, (pre ? pv : v) + base, ks, nk);
}

template <int D>
__device__ void attn_fwd_tc(const AttnParams p, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                            const bf16_t* pk, const bf16_t* pv, const u32_t* prows, const u8_t* mask,
                            const bf16_t* bias, bf16_t* o, float* lse) {
    static_assert(D % 16 == 0 && D >= 32, "head dims in k16 chunks, two n8 tiles per ldmatrix.x4");
    constexpr int LD = D + TC_PAD, KC = D / 16, NT = D / 8;
    TUNA_DYN_SMEM(TcChunk, smem);
    bf16_t* Qs = reinterpret_cast<bf16_t*>(smem);  // [64][LD]
    bf16_t* Ks = Qs + TC_ROWS * LD;                // [2][64][LD]
    bf16_t* Vs = Ks + 2 * TC_KEYS * LD;            // [2][64][LD]
    if (p.head_dim != D || blockDim.x != TC_THREADS ||
        ((unsigned long long)q | (unsigned long long)k | (unsigned long long)v | (unsigned long long)pk |
         (unsigned long long)pv | (unsigned long long)o) % 16)
        __trap();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * TC_ROWS;
    int P, pstart;
    attn_prefix_range(p, prows, b, &pstart, &P);
    const int T_ = p.q_len, S = p.kv_len, off = S - T_;
    const long long SR = p.kv_cap ? p.kv_cap : S;  // key rows per sequence in k/v
    const int kvh = h / (p.heads / p.kv_heads);
    const long long qs = (long long)p.heads * D;
    const int q_last = min(q0 + TC_ROWS, T_) - 1;
    const int s_end = p.causal ? min(S, off + q_last + 1) : S;  // content keys any row here sees
    const int n_pt = (P + TC_KEYS - 1) / TC_KEYS, nt = n_pt + (s_end + TC_KEYS - 1) / TC_KEYS;

    if (nt > 0) {
        tc_load_rows<D>(Qs, q + ((long long)b * T_ + q0) * qs + (long long)h * D, qs, min(TC_ROWS, T_ - q0));
        tc_load_kv<D>(p, Ks, Vs, k, v, pk, pv, 0, n_pt, P, pstart, SR, b, kvh);
        cp_async_commit();
    }

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    float m[2] = {TUNA_NEG_INF, TUNA_NEG_INF}, l[2] = {0.f, 0.f};  // rows g and g+8 of the warp's 16
    u32_t qf[KC][4];
    const float sl2 = p.scale * ATTN_LOG2E;  // scores in log2 units, so exp2f is the exponential
    const int row0 = q0 + warp * 16 + g;

    for (int tile = 0; tile < nt; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < nt) {
            // buf ^ 1 was last read in iteration tile - 1, before its closing barrier
            tc_load_kv<D>(p, Ks + (buf ^ 1) * TC_KEYS * LD, Vs + (buf ^ 1) * TC_KEYS * LD, k, v, pk, pv, tile + 1,
                          n_pt, P, pstart, SR, b, kvh);
            cp_async_commit();
            cp_async_wait<1>();  // tile (and Q) landed, tile + 1 may be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies are visible
        if (tile == 0) {
#pragma unroll
            for (int kc = 0; kc < KC; ++kc)  // A 16x16: lane -> row lane % 16, col (lane / 16) * 8
                ldmatrix_x4(qf[kc], Qs + (warp * 16 + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);
        }
        const bf16_t* Kb = Ks + buf * TC_KEYS * LD;
        const bf16_t* Vb = Vs + buf * TC_KEYS * LD;

        // S = Q K^T, 16 x 64 per warp
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc)
#pragma unroll
            for (int j = 0; j < 8; j += 2) {  // lanes 0-15: key tile j, 16-31: j+1; lanes 8-15/24-31 the d+8 half
                u32_t r[4];
                ldmatrix_x4(r, Kb + (j * 8 + (lane >> 4) * 8 + (lane & 7)) * LD + kc * 16 + ((lane >> 3) & 1) * 8);
                const u32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_m16n8k16_bf16_f32(s[j], qf[kc], b0, s[j]);
                mma_m16n8k16_bf16_f32(s[j + 1], qf[kc], b1, s[j + 1]);
            }

        // mask and scale; s[j][e] is row row0 + (e >> 1) * 8, key column j * 8 + 2t + (e & 1)
        const bool pre = tile < n_pt;
        const int k0 = (pre ? tile : tile - n_pt) * TC_KEYS;
        const int nk = min(TC_KEYS, (pre ? P : S) - k0);
        float mx[2] = {TUNA_NEG_INF, TUNA_NEG_INF};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = j * 8 + 2 * t + (e & 1), kj = k0 + c, i = row0 + (e >> 1) * 8;
                const bool ok = c < nk && (pre || ((!p.has_mask || mask[(long long)b * S + kj] != 0) &&
                                                   (!p.causal || kj <= off + i)));
                float x = ok ? s[j][e] * sl2 : TUNA_NEG_INF;
                if (ok && p.has_bias && i < T_)  // bias column: the table's row, or prefix_len + key
                    x += ld(bias, attn_bias_off(p, h, i, pre ? pstart + kj : (int)p.prefix_len + kj)) * ATTN_LOG2E;
                s[j][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
        float mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            mu[r] = mn == TUNA_NEG_INF ? 0.f : mn;  // no key seen yet: avoid -inf - -inf
            const float alpha = exp2f(m[r] - mu[r]);
            l[r] *= alpha;
            m[r] = mn;
#pragma unroll
            for (int n = 0; n < NT; ++n) acc[n][2 * r] *= alpha, acc[n][2 * r + 1] *= alpha;
        }

        // O += P V, one k16 chunk of keys (n8 score tiles 2c, 2c+1) at a time
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            u32_t a[4];
            a[0] = tc_pack_bf16(exp2f(s[2 * c][0] - mu[0]), exp2f(s[2 * c][1] - mu[0]));
            a[1] = tc_pack_bf16(exp2f(s[2 * c][2] - mu[1]), exp2f(s[2 * c][3] - mu[1]));
            a[2] = tc_pack_bf16(exp2f(s[2 * c + 1][0] - mu[0]), exp2f(s[2 * c + 1][1] - mu[0]));
            a[3] = tc_pack_bf16(exp2f(s[2 * c + 1][2] - mu[1]), exp2f(s[2 * c + 1][3] - mu[1]));
            l[0] += (tc_lo(a[0]) + tc_hi(a[0])) + (tc_lo(a[2]) + tc_hi(a[2]));
            l[1] += (tc_lo(a[1]) + tc_hi(a[1])) + (tc_lo(a[3]) + tc_hi(a[3]));
#pragma unroll
            for (int n = 0; n < NT; n += 2) {  // lanes 0-15: d tile n, 16-31: n+1; lanes 8-15/24-31 keys +8
                u32_t r[4];
                ldmatrix_x4_trans(r, Vb + (c * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + n * 8 + (lane >> 4) * 8);
                const u32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_m16n8k16_bf16_f32(acc[n], a, b0, acc[n]);
                mma_m16n8k16_bf16_f32(acc[n + 1], a, b1, acc[n + 1]);
            }
        }
        __syncthreads();  // done reading buf before iteration tile + 1 refills it
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int i = row0 + r * 8;
        if (i >= T_) continue;
        // a row that saw no key outputs zeros; a NaN sum (a NaN score) a NaN row
        const bool seen = l[r] > 0.f || l[r] != l[r];
        const float inv = seen ? 1.f / l[r] : 0.f;
        bf16_t* orow = o + (((long long)b * T_ + i) * p.heads + h) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            *reinterpret_cast<u32_t*>(orow + n * 8 + 2 * t) = tc_pack_bf16(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        if (t == 0)
            lse[((long long)b * p.heads + h) * T_ + i] = seen ? (m[r] + log2f(l[r])) / ATTN_LOG2E : TUNA_NEG_INF;
    }
}

#define ATTN_TC_EMIT(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_fwd_d##D##_bf16(                     \
        const AttnParams p, const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* pk,               \
        const bf16_t* pv, const u32_t* prows, const u8_t* mask, const bf16_t* bias, bf16_t* o, float* lse) {   \
        attn_fwd_tc<D>(p, q, k, v, pk, pv, prows, mask, bias, o, lse);                                         \
    }
ATTN_TC_EMIT(32)
ATTN_TC_EMIT(64)
ATTN_TC_EMIT(128)
