#!/usr/bin/env python3
"""The attention table: tuna's and SDPA's JSON lines (benches/cuda_attention.rs,
scripts/gpu/attn_sdpa.py) joined by shape, forward+backward TFLOP/s and their ratio.

Usage: python3 scripts/gpu/attn_table.py tuna.jsonl sdpa.jsonl
"""
import json
import sys


def load(path, impl):
    rows = {}
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    r = json.loads(line)
                    if r.get("impl") != impl:
                        continue
                    rows[(r["seq"], r["head_dim"], r["causal"], r["prefix"])] = r
    except FileNotFoundError:
        pass
    return rows


def main():
    tuna, sdpa = load(sys.argv[1], "tuna"), load(sys.argv[2], "sdpa")
    print("| T | D | causal | prefix | tuna fwd+bwd TFLOP/s | SDPA fwd+bwd TFLOP/s | ratio | tuna fwd | SDPA fwd |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for key in sorted(set(tuna) | set(sdpa)):
        t, s = tuna.get(key), sdpa.get(key)
        fmt = lambda r, k: f"{r[k]:.1f}" if r else "-"
        ratio = f"{t['fwd_bwd_tflops'] / s['fwd_bwd_tflops']:.2f}x" if t and s else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {fmt(t, 'fwd_bwd_tflops')} | {fmt(s, 'fwd_bwd_tflops')} | {ratio} "
              f"| {fmt(t, 'fwd_tflops')} | {fmt(s, 'fwd_tflops')} |")


if __name__ == "__main__":
    main()
