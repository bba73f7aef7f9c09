#!/usr/bin/env python3
"""The GPU training-step table: tuna's and PyTorch + PEFT's JSON lines (crates/tuna-models/benches/
train_step.rs and scripts/bench/train_step.py, both --device cuda --model gpt2) joined by method:
tokens/s, their ratio, and for full fine-tuning the model FLOPs utilization as llm.c counts it
(6N + 6*L*C*T FLOPs per token, N = trainable parameters, L = 12, C = 768, T = the sequence) against
the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s); rows in f32 and with TF32 matmuls
(`--tf32` on both sides).

Usage: python3 scripts/gpu/train_table.py train.log [peak_tflops]
"""
import json
import sys


def main():
    peak = float(sys.argv[2]) if len(sys.argv) > 2 else 989.0
    rows = {}
    with open(sys.argv[1]) as f:
        for line in f:
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["method"], r.get("tf32", False), r["side"])] = r
    print(f"| method | matmuls | batch x seq | tuna tok/s | PyTorch+PEFT tok/s | ratio | tuna MFU | PyTorch MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for method, tf32 in [(m, tf) for m in ("full", "prompt", "prefix", "lora") for tf in (False, True)]:
        t, p = rows.get((method, tf32, "tuna")), rows.get((method, tf32, "pytorch+peft"))
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
        kind = "TF32" if tf32 else "f32"
        print(f"| {method} | {kind} | {r['batch']} x {r['seq']} | {tok(t)} | {tok(p)} | {ratio} | {mfu(t)} | {mfu(p)} |")


if __name__ == "__main__":
    main()
