#!/usr/bin/env python3
"""Markdown tables from train_step.sh's JSONL: tuna vs PyTorch + PEFT per (model, method), then the
FLOP floor of full fine-tuning. Usage: train_step_table.py RESULTS.jsonl [PEAK_GFLOPS]."""
import json
import sys

# Issue targets: tokens/s ratio (tuna / PyTorch) at least this; peak memory ratio at most MEM_MAX.
SPEED_MIN = {"prompt": 2.0, "prefix": 2.0, "full": 1.2}
MEM_MAX = 0.6


def matmul_params(model, layers):
    """Weights that take part in a matmul (the 6 N FLOP count's N): embedding lookups excluded,
    SmolLM2's tied head included (it is a [vocab, hidden] matmul), biases and norms left out."""
    if model == "minilm":
        h, ff = 384, 1536
        return layers * (4 * h * h + 2 * h * ff)
    h, ff, q, kv, vocab = 576, 1536, 576, 192, 49152
    return layers * (2 * h * q + 2 * h * kv + 3 * h * ff) + vocab * h


def main():
    path = sys.argv[1]
    peak = float(sys.argv[2]) if len(sys.argv) > 2 else 200.0
    rows = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            rows[(r["model"], r["method"], r["side"])] = r
    keys = []
    for (m, meth, _) in rows:
        if (m, meth) not in keys:
            keys.append((m, meth))
    any_row = next(iter(rows.values()))
    print(f"threads {any_row['threads']}; tokens/s count content tokens only (batch x seq per step)\n")
    print("| model | method | batch x seq | tuna tok/s | PyTorch+PEFT tok/s | ratio | tuna peak MiB "
          "| PyTorch peak MiB | ratio | target |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for (m, meth) in keys:
        t, p = rows.get((m, meth, "tuna")), rows.get((m, meth, "pytorch+peft"))
        ref = t or p
        name = m if m != "smollm2" or ref["layers"] == 30 else f"smollm2 ({ref['layers']} of 30 layers)"
        shape = f"{ref['batch']} x {ref['seq']}"
        fmt = lambda r, k, f: format(r[k], f) if r else "—"  # noqa: E731
        sr = t["tokens_per_s"] / p["tokens_per_s"] if t and p else None
        mr = t["peak_rss_mb"] / p["peak_rss_mb"] if t and p else None
        goals = []
        if meth in SPEED_MIN:
            ok = sr is not None and sr >= SPEED_MIN[meth]
            goals.append(f"speed ≥{SPEED_MIN[meth]}x {'met' if ok else 'MISSED'}")
        ok = mr is not None and mr <= MEM_MAX
        goals.append(f"mem ≤{MEM_MAX}x {'met' if ok else 'MISSED'}")
        ratio = lambda x: f"{x:.2f}x" if x is not None else "—"  # noqa: E731
        print(f"| {name} | {meth} | {shape} | {fmt(t, 'tokens_per_s', '.0f')} | {fmt(p, 'tokens_per_s', '.0f')} "
              f"| {ratio(sr)} | {fmt(t, 'peak_rss_mb', '.0f')} | {fmt(p, 'peak_rss_mb', '.0f')} | {ratio(mr)} "
              f"| {'; '.join(goals)} |")

    print("\nPer-step phases, ms (forward / backward / optimizer):\n")
    print("| model | method | tuna fwd | tuna bwd | tuna opt | PyTorch fwd | PyTorch bwd | PyTorch opt |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (m, meth) in keys:
        t, p = rows.get((m, meth, "tuna")), rows.get((m, meth, "pytorch+peft"))
        cell = lambda r, k: f"{r[k]:.0f}" if r else "—"  # noqa: E731
        print(f"| {m} | {meth} | {cell(t, 'fwd_ms')} | {cell(t, 'bwd_ms')} | {cell(t, 'opt_ms')} "
              f"| {cell(p, 'fwd_ms')} | {cell(p, 'bwd_ms')} | {cell(p, 'opt_ms')} |")

    print(f"\nFull fine-tuning against the FLOP floor: 6 x N x tokens per step, N = weights in a matmul "
          f"(embedding lookups excluded, SmolLM2's tied head included; attention scores left out), "
          f"at {peak:.0f} GFLOP/s (2 cores AVX-512 matmul peak):\n")
    print("| model | N (matmul) | GFLOP/step | floor ms | tuna ms | tuna GFLOP/s | PyTorch ms | PyTorch GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (m, meth) in keys:
        if meth != "full":
            continue
        t, p = rows.get((m, meth, "tuna")), rows.get((m, meth, "pytorch+peft"))
        ref = t or p
        n = matmul_params(m, ref["layers"])
        gflop = 6 * n * ref["batch"] * ref["seq"] / 1e9
        ach = lambda r: (f"{r['step_ms']:.0f}", f"{gflop / (r['step_ms'] / 1e3):.1f}") if r else ("—", "—")  # noqa: E731
        (tm, tg), (pm, pg) = ach(t), ach(p)
        print(f"| {m} | {n / 1e6:.1f}M | {gflop:.1f} | {1e3 * gflop / peak:.0f} | {tm} | {tg} | {pm} | {pg} |")


if __name__ == "__main__":
    main()
