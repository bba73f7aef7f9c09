// attention_bwd.cuh: the main backward kernel of attention.cu (included there, after the
// helpers and constants it uses).
//
// Grid (ceil(P/32) + ceil(S/32), kv_heads, batch), 256 threads: block x < ceil(P/32) owns 32
// prefix keys, the others 32 content keys of sequence b. For every query head of the GQA group
// and every 32-row query block that can see those keys, it recomputes P = exp(s - lse) and
// dS = P * (dP - delta) in shared memory (phase 2, one query row per lane), accumulates dK, dV
// in registers (phase 3, warp w owns keys w*4..w*4+3, lane owns columns lane + 32c) and adds
// dQ = scale * dS K into the f32 scratch dq_acc with atomicAdd (phase 4, warp w owns query rows
// w*4..w*4+3). At the end content dK/dV are accumulated into dk/dv (this block is their only
// writer) and prefix dK/dV are added atomically into dpk/dpv (every batch adds into them). With
// per-sequence prefix ranges, prefix block x covers rows 32x.. of sequence b's own range; blocks
// past its length return at once (the whole block, before any barrier). With a score bias, phase 2
// adds it to the scores and phase 3 also adds dS (before scale) into dbias with atomicAdd, one warp
// per query row and one lane per key (coalesced); every batch adds into the same rows, so dbias,
// like dpk/dpv and dq_acc, is summed in a nondeterministic order.
//
// Shared: Ks, Vs, Qs, dOs [32][D+1], Ps, dSs [32][33], lse_s, dl_s [32]; key_ok_s is static.

template <typename T, int D>
__device__ void attn_bwd(const AttnParams p, const T* q, const T* k, const T* v, const T* pk,
                         const T* pv, const u32_t* prows, const u8_t* mask, const T* bias, const T* d_o,
                         const float* lse, const float* delta, float* dq_acc, T* dk, T* dv, float* dpk, float* dpv,
                         float* dbias) {
    constexpr int C = D / 32, DP = D + 1, PP = ATTN_TILE + 1;
    TUNA_DYN_SMEM(float, smem);
    float* Ks = smem;
    float* Vs = Ks + ATTN_TILE * DP;
    float* Qs = Vs + ATTN_TILE * DP;
    float* dOs = Qs + ATTN_TILE * DP;
    float* Ps = dOs + ATTN_TILE * DP;
    float* dSs = Ps + ATTN_TILE * PP;
    float* lse_s = dSs + ATTN_TILE * PP;
    float* dl_s = lse_s + ATTN_TILE;
    TUNA_SHARED(int, key_ok_s, [ATTN_TILE]);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int b = blockIdx.z, kvh = blockIdx.y;
    const int T_ = p.q_len, S = p.kv_len, off = S - T_;
    const AttnKeyBlock kb = attn_key_block(p, prows, b, (int)blockIdx.x, ATTN_TILE);
    if (kb.nk == 0) return;  // past this sequence's prefix: uniform for the whole block
    const bool pre = kb.pre;
    const int k0 = kb.k0, nk = kb.nk, pstart = kb.pstart, bcol0 = kb.bcol0;
    const int group = p.heads / p.kv_heads;
    const int HD = p.head_dim;  // <= D; columns HD..D-1 of the tiles are zero
    const long long qs = (long long)p.heads * HD, ks = (long long)p.kv_heads * HD;
    const float sl2 = p.scale * ATTN_LOG2E;

    {
        const long long base = pre ? ((long long)(pstart + k0) * p.kv_heads + kvh) * HD
                                   : (((long long)b * S + k0) * p.kv_heads + kvh) * HD;
        attn_load_tile<T, D>(Ks, DP, pre ? pk : k, base, ks, nk, HD);
        attn_load_tile<T, D>(Vs, DP, pre ? pv : v, base, ks, nk, HD);
        if (tid < ATTN_TILE)
            key_ok_s[tid] = tid < nk && (pre || !p.has_mask || mask[(long long)b * S + k0 + tid] != 0);
        // the __syncthreads at the top of the first q-block iteration publishes these
    }

    float dK[ATTN_RPW][C], dV[ATTN_RPW][C];
#pragma unroll
    for (int kk = 0; kk < ATTN_RPW; ++kk)
#pragma unroll
        for (int c = 0; c < C; ++c) dK[kk][c] = dV[kk][c] = 0.f;

    // causal: query i sees content key j iff j <= off + i, so blocks before this one see nothing
    const int qb_first = (pre || !p.causal) ? 0 : max(0, k0 - off) / ATTN_TILE;
    const int n_qb = (T_ + ATTN_TILE - 1) / ATTN_TILE;
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int qb = qb_first; qb < n_qb; ++qb) {
            const int q0 = qb * ATTN_TILE, nq = min(ATTN_TILE, T_ - q0);
            __syncthreads();  // previous q block's tiles are no longer read
            const long long qbase = ((long long)b * T_ + q0) * qs + (long long)h * HD;
            attn_load_tile<T, D>(Qs, DP, q, qbase, qs, nq, HD);
            attn_load_tile<T, D>(dOs, DP, d_o, qbase, qs, nq, HD);
            if (tid < ATTN_TILE) {
                const long long li = ((long long)b * p.heads + h) * T_ + q0 + tid;
                lse_s[tid] = tid < nq ? lse[li] * ATTN_LOG2E : TUNA_NEG_INF;
                dl_s[tid] = tid < nq ? delta[li] : 0.f;
            }
            __syncthreads();

            // phase 2: P and dS for query row `lane` and this warp's keys
            {
                float sc[ATTN_RPW], dp[ATTN_RPW];
#pragma unroll
                for (int kk = 0; kk < ATTN_RPW; ++kk) sc[kk] = dp[kk] = 0.f;
#pragma unroll 8
                for (int d = 0; d < D; ++d) {
                    const float qd = Qs[lane * DP + d], od = dOs[lane * DP + d];
#pragma unroll
                    for (int kk = 0; kk < ATTN_RPW; ++kk) {
                        const int key = warp * ATTN_RPW + kk;
                        sc[kk] += qd * Ks[key * DP + d];
                        dp[kk] += od * Vs[key * DP + d];
                    }
                }
                const float l2 = lse_s[lane], dl = dl_s[lane];
                const int i = q0 + lane;
#pragma unroll
                for (int kk = 0; kk < ATTN_RPW; ++kk) {
                    const int key = warp * ATTN_RPW + kk;
                    // lse = -inf: a row that saw no key (or a row past T) has P = 0
                    const bool ok = key_ok_s[key] && l2 != TUNA_NEG_INF && (pre || !p.causal || k0 + key <= off + i);
                    const float bb = ok && p.has_bias ? ld(bias, attn_bias_off(p, h, i, bcol0 + key)) * ATTN_LOG2E : 0.f;
                    const float pr = ok ? exp2f(sc[kk] * sl2 + bb - l2) : 0.f;
                    Ps[lane * PP + key] = pr;
                    dSs[lane * PP + key] = pr * (dp[kk] - dl);
                }
            }
            __syncthreads();

            // dbias += dS: warp w takes query rows w, w+8, ..; lane = key (dS is 0 where P is)
            if (p.has_bias == 1 && lane < nk)
                for (int il = warp; il < nq; il += ATTN_WARPS)
                    atomicAdd(dbias + attn_bias_off(p, h, q0 + il, bcol0 + lane), dSs[il * PP + lane]);

            // phase 3: dV += P^T dO, dK += dS^T Q (scale applied at the end)
            for (int i = 0; i < nq; ++i) {
                float qv[C], ov[C];
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    qv[c] = Qs[i * DP + lane + 32 * c];
                    ov[c] = dOs[i * DP + lane + 32 * c];
                }
#pragma unroll
                for (int kk = 0; kk < ATTN_RPW; ++kk) {
                    const int key = warp * ATTN_RPW + kk;
                    const float pr = Ps[i * PP + key], ds = dSs[i * PP + key];
#pragma unroll
                    for (int c = 0; c < C; ++c) {
                        dV[kk][c] += pr * ov[c];
                        dK[kk][c] += ds * qv[c];
                    }
                }
            }

            // phase 4: dQ += scale * dS K, added atomically (other key blocks add to the same rows)
#pragma unroll
            for (int r = 0; r < ATTN_RPW; ++r) {
                const int il = warp * ATTN_RPW + r;
                if (il >= nq) continue;
                float a[C];
#pragma unroll
                for (int c = 0; c < C; ++c) a[c] = 0.f;
                for (int key = 0; key < nk; ++key) {
                    const float ds = dSs[il * PP + key];
#pragma unroll
                    for (int c = 0; c < C; ++c) a[c] += ds * Ks[key * DP + lane + 32 * c];
                }
                const long long qi = (((long long)b * T_ + q0 + il) * p.heads + h) * HD;
#pragma unroll
                for (int c = 0; c < C; ++c)
                    if (lane + 32 * c < HD) atomicAdd(dq_acc + qi + lane + 32 * c, a[c] * p.scale);
            }
        }
    }

#pragma unroll
    for (int kk = 0; kk < ATTN_RPW; ++kk) {
        const int key = warp * ATTN_RPW + kk;
        if (key >= nk) continue;
        const int j = k0 + key;
        if (pre) {
            const long long pi = ((long long)(pstart + j) * p.kv_heads + kvh) * HD;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if (lane + 32 * c >= HD) continue;
                atomicAdd(dpk + pi + lane + 32 * c, dK[kk][c] * p.scale);
                atomicAdd(dpv + pi + lane + 32 * c, dV[kk][c]);
            }
        } else {
            const long long ki = (((long long)b * S + j) * p.kv_heads + kvh) * HD;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if (lane + 32 * c >= HD) continue;
                acc(dk, ki + lane + 32 * c, dK[kk][c] * p.scale);
                acc(dv, ki + lane + 32 * c, dV[kk][c]);
            }
        }
    }
}
