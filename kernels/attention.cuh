// attention.cuh: what the SIMT attention kernels (attention.cu) and the tensor-core forward
// (attention_tc.cu) share: the parameter struct (mirrored by `AttnParams` in
// crates/tuna-kernels/src/ops/attention/mod.rs, where the layouts and masking rules are) and the
// per-sequence prefix range, the keys a backward block owns and the score bias offset.
#pragma once

#define ATTN_LOG2E 1.4426950408889634f

struct AttnParams {
    u32_t batch, heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, has_mask, has_prefix_rows;
    u32_t kv_cap;  // k/v rows per sequence (batch stride), 0 = kv_len; the forward only (see mod.rs)
    u32_t has_bias;  // an additive score bias [heads, q_len, prefix_len + kv_len]: 0 none, 1 with dbias, 2 without
    float scale;
};

// Sequence b's prefix rows: [*start, *start + *len) of the table (all of it without per-sequence
// ranges), clamped to the table so a bad range can never read or write outside it.
__device__ __forceinline__ void attn_prefix_range(const AttnParams& p, const u32_t* prows, int b, int* start,
                                                  int* len) {
    if (p.has_prefix_rows) {
        const u32_t s = min(prows[2 * b], p.prefix_len);
        *start = (int)s;
        *len = (int)min(prows[2 * b + 1], p.prefix_len - s);
    } else {
        *start = 0;
        *len = (int)p.prefix_len;
    }
}

// The keys backward block `blk` owns, in blocks of `tile`: the prefix table's ceil(prefix_len/tile)
// blocks first, then the content's. `pre`: prefix keys (rows k0.. of sequence b's prefix range,
// which starts at table row `pstart`), else content keys k0..; `nk` of them, 0 for a prefix block
// past this sequence's range (nothing to do); `bcol0`: the score bias column of key 0.
struct AttnKeyBlock {
    bool pre;
    int k0, nk, pstart, bcol0;
};
__device__ __forceinline__ AttnKeyBlock attn_key_block(const AttnParams& p, const u32_t* prows, int b, int blk,
                                                       int tile) {
    AttnKeyBlock kb;
    int P;
    attn_prefix_range(p, prows, b, &kb.pstart, &P);
    const int n_pb = ((int)p.prefix_len + tile - 1) / tile;  // of the whole table
    kb.pre = blk < n_pb;
    kb.k0 = (kb.pre ? blk : blk - n_pb) * tile;
    kb.nk = kb.pre && kb.k0 >= P ? 0 : min(tile, (kb.pre ? P : (int)p.kv_len) - kb.k0);
    kb.bcol0 = kb.pre ? kb.pstart + kb.k0 : (int)p.prefix_len + kb.k0;
    return kb;
}

// Offset of bias[h, i, col] (row stride prefix_len + kv_len: the whole prefix table, then content).
__device__ __forceinline__ long long attn_bias_off(const AttnParams& p, int h, int i, int col) {
    return ((long long)h * p.q_len + i) * ((long long)p.prefix_len + p.kv_len) + col;
}
