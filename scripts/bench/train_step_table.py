#!/usr/bin/env python3
"""Markdown tables from train_step.sh's JSONL: tuna (base weights f32 / bf16 / int8) vs PyTorch + PEFT
(f32 and bf16 autocast) per (model, method, batch x seq), the per-phase times, then the FLOP floor of
full fine-tuning. Rows are keyed by (model, method, batch, seq, side, precision); missing or failed
runs show "—" (failures are listed under the first table). Usage: train_step_table.py RESULTS.jsonl
[PEAK_GFLOPS]."""
import json
import sys

# Issue targets. Speed: tokens/s of tuna f32 vs PyTorch f32 (every method), and of the best tuna
# low-precision base vs PyTorch f32 and vs PyTorch bf16 autocast (parameter-efficient methods).
# Memory: the best tuna peak RSS vs PyTorch f32's (parameter-efficient methods).
PE_METHODS = ("prompt", "prefix", "lora")
F32_SPEED_MIN = 1.1
LOWP_SPEED_MIN = 2.0
PE_MEM_MAX = 0.3
TUNA_PRECS = ("f32", "bf16", "int8")
PT_F32, PT_AC = ("pytorch+peft", "f32"), ("pytorch+peft", "bf16-autocast")
RUN_ORDER = [PT_F32, PT_AC] + [("tuna", p) for p in TUNA_PRECS]


def run_name(side, prec):
    return f"PyTorch {prec}" if side == "pytorch+peft" else f"tuna {prec} base"


def matmul_params(model, layers):
    """Weights that take part in a matmul (the 6 N FLOP count's N): embedding lookups excluded,
    SmolLM2's tied head included (it is a [vocab, hidden] matmul), biases and norms left out."""
    if model == "minilm":
        h, ff = 384, 1536
        return layers * (4 * h * h + 2 * h * ff)
    if model == "gpt2":
        h, vocab = 768, 50257
        return layers * 12 * h * h + vocab * h
    h, ff, q, kv, vocab = 576, 1536, 576, 192, 49152
    return layers * (2 * h * q + 2 * h * kv + 3 * h * ff) + vocab * h


def precision_of(r):
    if r.get("side") == "tuna":
        return r.get("base_precision", "f32")
    return r.get("precision", "f32")


def main():
    path = sys.argv[1]
    peak = float(sys.argv[2]) if len(sys.argv) > 2 else 200.0
    rows, errors, keys = {}, [], []
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (r.get("model"), r.get("method"), r.get("batch"), r.get("seq"))
        run = (r.get("side"), precision_of(r))
        if None in key or None in run:
            continue
        if "error" in r or "tokens_per_s" not in r:
            errors.append((key, run, r.get("error", "no result")))
            continue
        rows[key + run] = r
        if key not in keys:
            keys.append(key)
    if not rows:
        print("no results" + (f" ({len(errors)} failed runs)" if errors else ""))
        for (m, meth, b, t), run, err in errors:
            print(f"- {m} {meth} {b} x {t} {run_name(*run)}: {err}")
        return

    get = lambda key, run: rows.get(key + run)  # noqa: E731
    any_row = next(iter(rows.values()))

    def name(key):
        m = key[0]
        ref = next(get(key, run) for run in RUN_ORDER if get(key, run))
        return m if m != "smollm2" or ref["layers"] == 30 else f"smollm2 ({ref['layers']} of 30 layers)"

    num = lambda r, k: f"{r[k]:.0f}" if r else "—"  # noqa: E731
    ratio = lambda x: f"{x:.2f}x" if x is not None else "—"  # noqa: E731
    div = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    tps = lambda r: r["tokens_per_s"] if r else None  # noqa: E731

    paths = {prec: sorted({r.get("lowp_path") or "widen" for r in rows.values()
                           if r.get("side") == "tuna" and r.get("base_precision") == prec}) or ["—"]
             for prec in ("bf16", "int8")}
    print(f"threads {any_row['threads']}; tokens/s count content tokens only (batch x seq per step); "
          f"ratios are against PyTorch + PEFT f32; tuna bf16/int8 = frozen block weights held in bf16 / int8 "
          f"(one scale per 64 inputs of an output channel; full fine-tuning is f32 only); "
          f"bf16 products on: {', '.join(paths['bf16'])}; int8 products on: {', '.join(paths['int8'])} "
          f"(TUNA_CPU_MATRIX_BF16's / TUNA_CPU_MATRIX's names; widen = f32 FMA)\n")
    print("| model | method | batch x seq | PyTorch f32 tok/s | PyTorch bf16-autocast tok/s "
          "| tuna f32 tok/s | ratio | tuna bf16 tok/s | ratio | tuna int8 tok/s | ratio "
          "| PyTorch f32 peak MiB | tuna f32 MiB | tuna bf16 MiB | tuna int8 MiB | best tuna / PyTorch mem "
          "| targets |")
    print("|---|---|---|" + "---:|" * 13 + "---|")
    for key in keys:
        m, meth, b, t = key
        p, pa = get(key, PT_F32), get(key, PT_AC)
        tu = {prec: get(key, ("tuna", prec)) for prec in TUNA_PRECS}
        cells = [name(key), meth, f"{b} x {t}", num(p, "tokens_per_s"), num(pa, "tokens_per_s")]
        for prec in TUNA_PRECS:
            cells += [num(tu[prec], "tokens_per_s"), ratio(div(tps(tu[prec]), tps(p)))]
        cells += [num(p, "peak_rss_mb")] + [num(tu[prec], "peak_rss_mb") for prec in TUNA_PRECS]
        tuna_mem = [r["peak_rss_mb"] for r in tu.values() if r]
        mem_r = div(min(tuna_mem) if tuna_mem else None, p["peak_rss_mb"] if p else None)
        cells.append(ratio(mem_r))

        # a target whose runs are missing shows "—" rather than met/MISSED
        verdict = lambda x, ok: "—" if x is None else "met" if ok(x) else "MISSED"  # noqa: E731
        goals = []
        f32_r = div(tps(tu["f32"]), tps(p))
        goals.append(f"f32 ≥{F32_SPEED_MIN}x {verdict(f32_r, lambda x: x >= F32_SPEED_MIN)}")
        if meth in PE_METHODS:
            lowp = [tps(tu[prec]) for prec in ("bf16", "int8") if tu[prec]]
            best = max(lowp) if lowp else None
            best_r = div(best, tps(p))
            goals.append(f"low-precision ≥{LOWP_SPEED_MIN}x {verdict(best_r, lambda x: x >= LOWP_SPEED_MIN)}")
            goals.append(f"> autocast {verdict(div(best, tps(pa)), lambda x: x > 1.0)}")
            goals.append(f"mem ≤{PE_MEM_MAX}x {verdict(mem_r, lambda x: x <= PE_MEM_MAX)}")
        cells.append("; ".join(goals))
        print("| " + " | ".join(cells) + " |")
    if errors:
        print("\nFailed runs (shown as —):\n")
        for (m, meth, b, t), run, err in errors:
            print(f"- {m} {meth} {b} x {t} {run_name(*run)}: {err}")

    print("\nPer-step phases, ms (forward / backward / optimizer, and the whole step):\n")
    print("| model | method | batch x seq | run | fwd | bwd | opt | step | loss |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for key in keys:
        for run in RUN_ORDER:
            r = get(key, run)
            if r:
                print(f"| {name(key)} | {key[1]} | {key[2]} x {key[3]} | {run_name(*run)} | {num(r, 'fwd_ms')} "
                      f"| {num(r, 'bwd_ms')} | {num(r, 'opt_ms')} | {num(r, 'step_ms')} | {r.get('loss', '—')} |")

    full = [k for k in keys if k[1] == "full"]
    if not full:
        return
    print(f"\nFull fine-tuning against the FLOP floor: 6 x N x tokens per step, N = weights in a matmul "
          f"(embedding lookups excluded, SmolLM2's tied head included; attention scores left out), "
          f"at {peak:.0f} GFLOP/s (PEAK_GFLOPS: the f32 matmul peak of the cores in use, as the user set it; "
          f"200 when unset):\n")
    print("| model | batch x seq | N (matmul) | GFLOP/step | floor ms | tuna ms | tuna GFLOP/s | PyTorch f32 ms "
          "| PyTorch f32 GFLOP/s | PyTorch bf16-autocast ms | PyTorch bf16-autocast GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in full:
        ref = next(get(key, run) for run in RUN_ORDER if get(key, run))
        n = matmul_params(key[0], ref["layers"])
        gflop = 6 * n * key[2] * key[3] / 1e9
        ach = lambda r: (f"{r['step_ms']:.0f}", f"{gflop / (r['step_ms'] / 1e3):.1f}") if r else ("—", "—")  # noqa: E731
        (tm, tg), (pm, pg), (am, ag) = ach(get(key, ("tuna", "f32"))), ach(get(key, PT_F32)), ach(get(key, PT_AC))
        print(f"| {name(key)} | {key[2]} x {key[3]} | {n / 1e6:.1f}M | {gflop:.1f} | {1e3 * gflop / peak:.0f} "
              f"| {tm} | {tg} | {pm} | {pg} | {am} | {ag} |")


if __name__ == "__main__":
    main()
