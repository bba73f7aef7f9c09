// attention_tc_bwd.cu: the tensor-core attention backward (FlashAttention-2 algorithm) for bf16
// Q/K/V with head dims 32, 64 and 128, built from kernels/mma.cuh's primitives. Same parameters,
// buffers and outputs as attention.cu's main backward kernel (attention_bwd.cuh): it reads the
// forward's lse and the delta = rowsum(dO * O) of attention.cu's pre kernel, adds dQ (scaled) into
// the f32 scratch dq_acc with atomicAdd (attention.cu's dq_add converts it), accumulates content
// dK/dV into dk/dv (this block is their only writer), prefix dK/dV into the f32 dpk/dpv with
// atomicAdd (every sequence of the batch adds into the table's rows) and, with has_bias == 1, dS
// (before the scale, f32, unrounded) into dbias with atomicAdd. Covered: causal or not, the key
// padding mask, GQA (a block loops over the query heads of its KV head), prefix keys/values
// (whole table or per-sequence ranges), the KV offset (q_len < kv_len) and the score bias. The
// backward reads contiguous keys (no kv_cap: check_bwd refuses a strided cache). Not covered (the
// launcher keeps those calls on attention.cu, and the kernel traps if handed one): other head
// dims, buffers not 16-byte aligned.
//
// Block: 4 warps, 64 keys (warp w owns keys 16w..16w+15 of the tile), grid (ceil(prefix_len/64) +
// ceil(kv_len/64), kv_heads, batch): block x < ceil(prefix_len/64) owns 64 prefix keys of the
// sequence's range (blocks past its length return at once), the others 64 content keys. K and V
// of the tile are loaded once; the block then walks the query tiles (64 rows) of every query head
// of the GQA group, skipping, when causal, the content tiles wholly before its first key. Q, dO,
// lse and delta of a query tile arrive by cp.async into two shared buffers (tile n+1 in flight
// while tile n is used); rows past q_len are zero-filled (lse -inf, delta 0) by plain stores.
// Shared rows are padded from D to D+8 bf16 as in attention_tc.cu (no ldmatrix bank conflicts).
//
// Per query tile and warp, everything transposed (rows = the warp's 16 keys, columns = queries),
// so the score accumulators are directly the A fragments of the products over queries; the 64
// queries go in two parts of 32 (the f32 S^T and dP^T of a part, 32 registers, live next to the
// dK/dV accumulators: ptxas fits every head dim without spills):
//   S^T  = K Q^T      A: K rows (ldmatrix.x4), B: Q stored query-major = "col" B (ldmatrix.x4)
//   dP^T = V dO^T     likewise from V and dO
//   P^T  = exp2(S^T * scale*log2e + bias*log2e - lse*log2e) (0 where masked or lse = -inf)
//   dS^T = P^T * (dP^T - delta)
//   dV  += P^T dO     A: P^T packed to bf16 in registers (C layout of n8 tiles 2c, 2c+1 = A layout
//                     of k16 chunk c, as in the forward), B: dO k-major (ldmatrix.x4.trans)
//   dK  += dS^T Q     A: dS^T packed likewise, B: Q (ldmatrix.x4.trans)
// dS^T is also stored to shared (bf16, [key][query]); after a barrier warp w computes dQ for query
// rows 16w..16w+15: dQ = dS K over the block's 64 keys, A from the stored dS^T by ldmatrix.x4.trans
// (A[m=query][k=key] = stored[key][query]), B = K k-major (ldmatrix.x4.trans), f32 results added
// into dq_acc (scaled) with atomicAdd, at most 64 columns at a time to bound registers.
// P and dS are rounded to bf16 before their products (the tests derive their tolerance from it);
// scores, dP, dK, dV and dQ accumulate in f32.
#include "common.cuh"
#include "mma.cuh"
#include "attention.cuh"

#define TCB_KEYS 64  // keys per block (4 warps x 16)
#define TCB_ROWS 64  // query rows per tile
#define TCB_THREADS 128
#define TCB_PAD 8  // bf16 of padding per shared row
#define TCB_LDS (TCB_ROWS + TCB_PAD)  // pitch of the dS^T tile [64 keys][64 queries]

// The unit of dynamic shared memory: 16 bytes, so the buffers start 16-byte aligned.
struct alignas(16) TcbChunk {
    u32_t w[4];
};

// Two floats as a bf16 pair (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32_t tcb_pack(float lo, float hi) {
    return (u32_t)f32_to_bf16(lo) | ((u32_t)f32_to_bf16(hi) << 16);
}

// 64 rows of D bf16 (global row r at src + r * stride, 16-byte aligned) into shared dst (pitch
// D + TCB_PAD) by cp.async; rows nvalid.. are zero-filled.
template <int D>
__device__ __forceinline__ void tcb_load_rows(bf16_t* dst, const bf16_t* src, long long stride, int nvalid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int LD = D + TCB_PAD;
    static_assert((TCB_ROWS * CPR) % TCB_THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < TCB_ROWS * CPR / TCB_THREADS; ++i) {
        const int idx = threadIdx.x + i * TCB_THREADS, r = idx / CPR, c = (idx % CPR) * 8;
        bf16_t* d = dst + r * LD + c;
        if (r < nvalid)
            cp_async_16(d, src + r * stride + c);
        else
            *reinterpret_cast<TcbChunk*>(d) = TcbChunk{{0u, 0u, 0u, 0u}};
    }
}

// Query tile `it` of the block's walk (head hh = it / nq, tile qb_first + it % nq): Q and dO rows
// into Qd / dOd, lse (times log2e is applied at use) and delta into Ld / Dd (-inf and 0 past q_len).
template <int D>
__device__ __forceinline__ void tcb_load_q(const AttnParams& p, bf16_t* Qd, bf16_t* dOd, float* Ld, float* Dd,
                                           const bf16_t* q, const bf16_t* d_o, const float* lse,
                                           const float* delta, int it, int nq, int qb_first, int b, int kvh,
                                           int group) {
    const int h = kvh * group + it / nq, q0 = (qb_first + it % nq) * TCB_ROWS, T_ = p.q_len;
    const int nv = min(TCB_ROWS, T_ - q0);
    const long long qs = (long long)p.heads * D;
    const long long base = ((long long)b * T_ + q0) * qs + (long long)h * D;
    tcb_load_rows<D>(Qd, q + base, qs, nv);
    tcb_load_rows<D>(dOd, d_o + base, qs, nv);
    const int r = threadIdx.x & 63;
    float* dst = threadIdx.x < 64 ? Ld : Dd;
    const float* src = (threadIdx.x < 64 ? lse : delta) + ((long long)b * p.heads + h) * T_ + q0;
    if (r < nv)
        cp_async_4(dst + r, src + r);
    else
        dst[r] = threadIdx.x < 64 ? TUNA_NEG_INF : 0.f;
}

template <int D>
__device__ void attn_bwd_tc(const AttnParams p, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                            const bf16_t* pk, const bf16_t* pv, const u32_t* prows, const u8_t* mask,
                            const bf16_t* bias, const bf16_t* d_o, const float* lse, const float* delta,
                            float* dq_acc, bf16_t* dk, bf16_t* dv, float* dpk, float* dpv, float* dbias) {
    static_assert(D % 16 == 0 && D >= 32, "head dims in k16 chunks, two n8 tiles per ldmatrix.x4");
    constexpr int LD = D + TCB_PAD, KC = D / 16, NT = D / 8;
    constexpr int QN = NT < 8 ? NT : 8;  // n8 tiles of dQ per pass
    constexpr int QH = 2, JN = 8 / QH;  // query parts per tile, n8 tiles per part
    TUNA_DYN_SMEM(TcbChunk, smem);
    bf16_t* Ks = reinterpret_cast<bf16_t*>(smem);  // [64][LD]
    bf16_t* Vs = Ks + TCB_KEYS * LD;              // [64][LD]
    bf16_t* Qs = Vs + TCB_KEYS * LD;              // [2][64][LD]
    bf16_t* dOs = Qs + 2 * TCB_ROWS * LD;         // [2][64][LD]
    bf16_t* dSs = dOs + 2 * TCB_ROWS * LD;        // [64 keys][TCB_LDS]
    float* lse_s = reinterpret_cast<float*>(dSs + TCB_KEYS * TCB_LDS);  // [2][64]
    float* dl_s = lse_s + 2 * TCB_ROWS;                                 // [2][64]
    if (p.head_dim != D || blockDim.x != TCB_THREADS ||
        ((unsigned long long)q | (unsigned long long)k | (unsigned long long)v | (unsigned long long)pk |
         (unsigned long long)pv | (unsigned long long)d_o) % 16)
        __trap();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, kvh = blockIdx.y;
    const int T_ = p.q_len, S = p.kv_len, off = S - T_;
    const AttnKeyBlock kb = attn_key_block(p, prows, b, (int)blockIdx.x, TCB_KEYS);
    if (kb.nk == 0) return;  // past this sequence's prefix: uniform for the whole block
    const bool pre = kb.pre;
    const int k0 = kb.k0, nk = kb.nk, pstart = kb.pstart, bcol0 = kb.bcol0;
    const int group = p.heads / p.kv_heads;
    const long long ks = (long long)p.kv_heads * D;

    // causal: query i sees content key j iff j <= off + i, so tiles before this one see nothing
    const int qb_first = (pre || !p.causal) ? 0 : max(0, k0 - off) / TCB_ROWS;
    const int nq = (T_ + TCB_ROWS - 1) / TCB_ROWS - qb_first;
    const int nit = group * nq;
    if (nq <= 0) return;  // no query sees these keys (and they get no gradient): whole block

    {
        const long long base = pre ? ((long long)(pstart + k0) * p.kv_heads + kvh) * D
                                   : (((long long)b * S + k0) * p.kv_heads + kvh) * D;
        tcb_load_rows<D>(Ks, (pre ? pk : k) + base, ks, nk);
        tcb_load_rows<D>(Vs, (pre ? pv : v) + base, ks, nk);
        tcb_load_q<D>(p, Qs, dOs, lse_s, dl_s, q, d_o, lse, delta, 0, nq, qb_first, b, kvh, group);
        cp_async_commit();
    }

    // this thread's two key rows (of the tile): kr[0] = 16w + g, kr[1] = 16w + g + 8
    bool key_ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int c = warp * 16 + g + r * 8;
        key_ok[r] = c < nk && (pre || !p.has_mask || mask[(long long)b * S + k0 + c] != 0);
    }

    float dK[NT][4], dV[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dK[n][e] = dV[n][e] = 0.f;
    const float sl2 = p.scale * ATTN_LOG2E;

    for (int it = 0; it < nit; ++it) {
        const int buf = it & 1;
        if (it + 1 < nit) {
            // buf ^ 1 was last read in iteration it - 1, before its dS barrier
            tcb_load_q<D>(p, Qs + (buf ^ 1) * TCB_ROWS * LD, dOs + (buf ^ 1) * TCB_ROWS * LD,
                          lse_s + (buf ^ 1) * TCB_ROWS, dl_s + (buf ^ 1) * TCB_ROWS, q, d_o, lse, delta, it + 1, nq,
                          qb_first, b, kvh, group);
            cp_async_commit();
            cp_async_wait<1>();  // tile it (and K, V) landed, it + 1 may be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies (and the previous dQ's reads of dSs) are done
        const int h = kvh * group + it / nq, q0 = (qb_first + it % nq) * TCB_ROWS;
        const bf16_t* Qb = Qs + buf * TCB_ROWS * LD;
        const bf16_t* dOb = dOs + buf * TCB_ROWS * LD;
        const float* Lb = lse_s + buf * TCB_ROWS;
        const float* Db = dl_s + buf * TCB_ROWS;

        // The tile's 64 queries in QH parts of JN n8 tiles, to bound the registers next to the dK/dV
        // accumulators.
#pragma unroll
        for (int hq = 0; hq < QH; ++hq) {
            // S^T = K Q^T and dP^T = V dO^T, 16 keys x 8*JN queries per warp
            float s[JN][4], dp[JN][4];
#pragma unroll
            for (int j = 0; j < JN; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                u32_t ka[4], va[4];  // A 16x16: lane -> row lane % 16, col (lane / 16) * 8
                ldmatrix_x4(ka, Ks + (warp * 16 + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);
                ldmatrix_x4(va, Vs + (warp * 16 + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int j = 0; j < JN; j += 2) {  // lanes 0-15: query tile j, 16-31: j+1; lanes 8-15/24-31 d+8
                    const int ro =
                        ((hq * JN + j) * 8 + (lane >> 4) * 8 + (lane & 7)) * LD + kc * 16 + ((lane >> 3) & 1) * 8;
                    u32_t r[4];
                    ldmatrix_x4(r, Qb + ro);
                    const u32_t q0f[2] = {r[0], r[1]}, q1f[2] = {r[2], r[3]};
                    mma_m16n8k16_bf16_f32(s[j], ka, q0f, s[j]);
                    mma_m16n8k16_bf16_f32(s[j + 1], ka, q1f, s[j + 1]);
                    ldmatrix_x4(r, dOb + ro);
                    const u32_t o0f[2] = {r[0], r[1]}, o1f[2] = {r[2], r[3]};
                    mma_m16n8k16_bf16_f32(dp[j], va, o0f, dp[j]);
                    mma_m16n8k16_bf16_f32(dp[j + 1], va, o1f, dp[j + 1]);
                }
            }

            // P^T into s, dS^T into dp; element [j][e]: key row warp*16 + g + (e >> 1) * 8, query
            // column (hq * JN + j) * 8 + 2t + (e & 1) of the tile
#pragma unroll
            for (int j = 0; j < JN; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = (hq * JN + j) * 8 + 2 * t + (e & 1), i = q0 + c;
                    const int kr = warp * 16 + g + (e >> 1) * 8;
                    const float l2 = Lb[c] * ATTN_LOG2E;  // -inf: a row that saw no key, or past q_len
                    const bool ok = key_ok[e >> 1] && l2 != TUNA_NEG_INF && (pre || !p.causal || k0 + kr <= off + i);
                    const float bb =
                        ok && p.has_bias ? ld(bias, attn_bias_off(p, h, i, bcol0 + kr)) * ATTN_LOG2E : 0.f;
                    const float pr = ok ? exp2f(s[j][e] * sl2 + bb - l2) : 0.f;
                    s[j][e] = pr;
                    dp[j][e] = pr * (dp[j][e] - Db[c]);
                    if (p.has_bias == 1 && ok && i < T_ && kr < nk)  // dbias += dS (f32, unrounded; 0 where !ok)
                        atomicAdd(dbias + attn_bias_off(p, h, i, bcol0 + kr), dp[j][e]);
                }

            // P^T and dS^T as bf16 A fragments of the k16 chunks of queries (C layout of n8 tiles
            // 2c, 2c+1 = A layout of chunk c), so the f32 values are dead before the products;
            // dS^T also to shared for dQ
            u32_t pa[JN / 2][4], da[JN / 2][4];
#pragma unroll
            for (int c = 0; c < JN / 2; ++c) {
                pa[c][0] = tcb_pack(s[2 * c][0], s[2 * c][1]);
                pa[c][1] = tcb_pack(s[2 * c][2], s[2 * c][3]);
                pa[c][2] = tcb_pack(s[2 * c + 1][0], s[2 * c + 1][1]);
                pa[c][3] = tcb_pack(s[2 * c + 1][2], s[2 * c + 1][3]);
                da[c][0] = tcb_pack(dp[2 * c][0], dp[2 * c][1]);
                da[c][1] = tcb_pack(dp[2 * c][2], dp[2 * c][3]);
                da[c][2] = tcb_pack(dp[2 * c + 1][0], dp[2 * c + 1][1]);
                da[c][3] = tcb_pack(dp[2 * c + 1][2], dp[2 * c + 1][3]);
                const int col = (hq * JN / 2 + c) * 16 + 2 * t;
                u32_t* srow0 = reinterpret_cast<u32_t*>(dSs + (warp * 16 + g) * TCB_LDS + col);
                u32_t* srow1 = reinterpret_cast<u32_t*>(dSs + (warp * 16 + g + 8) * TCB_LDS + col);
                srow0[0] = da[c][0];
                srow1[0] = da[c][1];
                srow0[4] = da[c][2];  // + 8 bf16
                srow1[4] = da[c][3];
            }

            // dV += P^T dO, dK += dS^T Q, one k16 chunk of queries at a time
#pragma unroll
            for (int c = 0; c < JN / 2; ++c) {
#pragma unroll
                for (int n = 0; n < NT; n += 2) {  // lanes 0-15: d tile n, 16-31: n+1; lanes 8-15/24-31 queries +8
                    const int ro =
                        ((hq * JN / 2 + c) * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + n * 8 + (lane >> 4) * 8;
                    u32_t r[4];
                    ldmatrix_x4_trans(r, dOb + ro);
                    const u32_t o0f[2] = {r[0], r[1]}, o1f[2] = {r[2], r[3]};
                    mma_m16n8k16_bf16_f32(dV[n], pa[c], o0f, dV[n]);
                    mma_m16n8k16_bf16_f32(dV[n + 1], pa[c], o1f, dV[n + 1]);
                    ldmatrix_x4_trans(r, Qb + ro);
                    const u32_t q0f[2] = {r[0], r[1]}, q1f[2] = {r[2], r[3]};
                    mma_m16n8k16_bf16_f32(dK[n], da[c], q0f, dK[n]);
                    mma_m16n8k16_bf16_f32(dK[n + 1], da[c], q1f, dK[n + 1]);
                }
            }
        }
        __syncthreads();  // dS^T complete in shared

        // dQ (query rows 16w..16w+15 of the tile) = dS K over the block's keys, QN n8 tiles a pass
        const int i0 = q0 + warp * 16 + g;
        const long long qrow0 = (((long long)b * T_ + i0) * p.heads + h) * D;
        const long long qrow1 = qrow0 + 8LL * p.heads * D;
#pragma unroll
        for (int n0 = 0; n0 < NT; n0 += QN) {
            float dq[QN][4];
#pragma unroll
            for (int n = 0; n < QN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
#pragma unroll
            for (int kc = 0; kc < TCB_KEYS / 16; ++kc) {
                // A[m = query][k = key] = dSs[key][query]: matrices (keys 0-7, q 0-7), (keys 0-7,
                // q 8-15), (keys 8-15, q 0-7), (keys 8-15, q 8-15) transposed
                u32_t a[4];
                ldmatrix_x4_trans(a, dSs + (kc * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * TCB_LDS + warp * 16 +
                                         ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int n = 0; n < QN; n += 2) {
                    u32_t r[4];
                    ldmatrix_x4_trans(r, Ks + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (n0 + n) * 8 +
                                             (lane >> 4) * 8);
                    const u32_t k0f[2] = {r[0], r[1]}, k1f[2] = {r[2], r[3]};
                    mma_m16n8k16_bf16_f32(dq[n], a, k0f, dq[n]);
                    mma_m16n8k16_bf16_f32(dq[n + 1], a, k1f, dq[n + 1]);
                }
            }
#pragma unroll
            for (int n = 0; n < QN; ++n) {
                const int col = (n0 + n) * 8 + 2 * t;
                if (i0 < T_) {
                    atomicAdd(dq_acc + qrow0 + col, dq[n][0] * p.scale);
                    atomicAdd(dq_acc + qrow0 + col + 1, dq[n][1] * p.scale);
                }
                if (i0 + 8 < T_) {
                    atomicAdd(dq_acc + qrow1 + col, dq[n][2] * p.scale);
                    atomicAdd(dq_acc + qrow1 + col + 1, dq[n][3] * p.scale);
                }
            }
        }
    }

    // dK (scaled) and dV of keys warp*16 + g (+ 8), columns n * 8 + 2t (+ 1)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int kr = warp * 16 + g + r * 8;
        if (kr >= nk) continue;
        const int j = k0 + kr;
        if (pre) {
            const long long pi = ((long long)(pstart + j) * p.kv_heads + kvh) * D;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    atomicAdd(dpk + pi + n * 8 + 2 * t + e, dK[n][2 * r + e] * p.scale);
                    atomicAdd(dpv + pi + n * 8 + 2 * t + e, dV[n][2 * r + e]);
                }
        } else {
            const long long ki = (((long long)b * S + j) * p.kv_heads + kvh) * D;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    acc(dk, ki + n * 8 + 2 * t + e, dK[n][2 * r + e] * p.scale);
                    acc(dv, ki + n * 8 + 2 * t + e, dV[n][2 * r + e]);
                }
        }
    }
}

#define ATTN_TC_BWD_EMIT(D)                                                                                    \
    extern "C" __global__ void __launch_bounds__(TCB_THREADS) attention_tc_bwd_d##D##_bf16(                    \
        const AttnParams p, const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* pk,               \
        const bf16_t* pv, const u32_t* prows, const u8_t* mask, const bf16_t* bias, const bf16_t* d_o,         \
        const float* lse, const float* delta, float* dq_acc, bf16_t* dk, bf16_t* dv, float* dpk, float* dpv,   \
        float* dbias) {                                                                                        \
        attn_bwd_tc<D>(p, q, k, v, pk, pv, prows, mask, bias, d_o, lse, delta, dq_acc, dk, dv, dpk, dpv, dbias); \
    }
ATTN_TC_BWD_EMIT(32)
ATTN_TC_BWD_EMIT(64)
ATTN_TC_BWD_EMIT(128)
