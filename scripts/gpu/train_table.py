#!/usr/bin/env python3
"""The GPU training-step table: tuna's and PyTorch + PEFT's JSON lines (crates/tuna-models/benches/
train_step.rs and scripts/bench/train_step.py, both --device cuda --model gpt2) joined by method:
tokens/s, their ratio, and for full fine-tuning the model FLOPs utilization as llm.c counts it
(6N + 6*L*C*T FLOPs per token, N = trainable parameters, L = 12, C = 768, T = the sequence) against
the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s); rows in f32, with TF32 matmuls (`--tf32`
on both sides), and in bf16 (tuna's `--precision bf16` mixed precision beside PyTorch's bf16
autocast).

Usage: python3 scripts/gpu/train_table.py train.log [peak_tflops]
"""
import json
import sys


def kind_of(r):
    """What a row's matrix products compute in: "f32", "TF32" or "bf16"."""
    if r.get("tf32", False):
        return "TF32"
    return "bf16" if r.get("precision", "f32") in ("bf16", "bf16-autocast") else "f32"


def main():
    peak = float(sys.argv[2]) if len(sys.argv) > 2 else 989.0
    rows = {}
    with open(sys.argv[1]) as f:
        for line in f:
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["method"], kind_of(r), r["side"])] = r
    print(f"| method | matmuls | batch x seq | tuna tok/s | PyTorch+PEFT tok/s | ratio | tuna MFU | PyTorch MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for method, kind in [(m, k) for m in ("full", "prompt", "prefix", "lora") for k in ("f32", "TF32", "bf16")]:
        t, p = rows.get((method, kind, "tuna")), rows.get((method, kind, "pytorch+peft"))
        if not t and not p:
            continue
        r = t or p
        ratio = f"{t['tokens_per_s'] / p['tokens_per_s']:.2f}x" if t and p else "-"

        def mfu(x):
            if not x or method != "full":
                return "-"
            per_token = 6 * x["trainable"] + 6 * x["layers"] * 768 * x["seq"]
            return f"{100 * per_token * x['tokens_per_s'] / (peak * 1e12):.1f}%"

        tok = lambda x: f"{x['tokens_per_s']:.0f}" if x else "-"  # noqa: E731
        print(f"| {method} | {kind} | {r['batch']} x {r['seq']} | {tok(t)} | {tok(p)} | {ratio} | {mfu(t)} | {mfu(p)} |")


if __name__ == "__main__":
    main()
