#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention at the shapes of benches/cuda_attention.rs (bf16, CUDA):
one JSON line per case with forward and forward+backward TFLOP/s, counted as tuna counts them
(4*B*H*T*S*D per forward over the visible rectangle, causal halves the content part, backward =
2.5 x forward). Without a prefix SDPA picks its FlashAttention-2 backend (is_causal, no mask);
with a prefix, K/V are the prefix (shared by the batch) concatenated before the content and an
explicit boolean mask keeps the content causal, which SDPA runs on its memory-efficient backend.

Usage: python3 scripts/gpu/attn_sdpa.py [--quick]
"""
import json
import sys

import torch
import torch.nn.functional as F


def timed(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def case(t, d, causal, prefix, reps):
    b, h = max(1, 16384 // t), 2048 // d
    g = torch.Generator(device="cuda").manual_seed(11)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, do = mk(b, h, t, d), mk(b, h, t, d), mk(b, h, t, d), mk(b, h, t, d)
    mask = None
    if prefix:
        pk, pv = mk(1, h, prefix, d).expand(b, h, prefix, d), mk(1, h, prefix, d).expand(b, h, prefix, d)
        k, v = torch.cat([pk, k], 2).contiguous(), torch.cat([pv, v], 2).contiguous()
        mask = torch.ones(t, prefix + t, dtype=torch.bool, device="cuda")
        if causal:
            mask[:, prefix:] = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()
    for x in (q, k, v):
        x.requires_grad_(True)
    run = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)

    def fwd_bwd():
        run().backward(do)

    tf, tfb = timed(lambda: run(), reps), timed(fwd_bwd, reps)
    flops = 4.0 * b * h * t * ((t / 2 if causal else t) + prefix) * d
    print(json.dumps({
        "impl": "sdpa", "batch": b, "heads": h, "seq": t, "head_dim": d, "causal": causal, "prefix": prefix,
        "fwd_ms": tf * 1e3, "fwd_bwd_ms": tfb * 1e3, "fwd_tflops": flops / tf / 1e12,
        "fwd_bwd_tflops": 3.5 * flops / tfb / 1e12,
    }), flush=True)


def main():
    quick = "--quick" in sys.argv
    if not torch.cuda.is_available():
        print("attn_sdpa: no CUDA device; nothing measured")
        return
    seqs = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192]
    reps = 3 if quick else 10
    for d in (64, 128):
        for causal in (False, True):
            for t in seqs:
                case(t, d, causal, 0, reps)
    for prefix in (20, 200):
        case(2048, 128, True, prefix, reps)


if __name__ == "__main__":
    main()
