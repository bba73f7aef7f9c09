#!/usr/bin/env python3
"""Table and plot of scripts/bench/memory_length.sh's JSONL: peak memory and tokens/s against
sequence length per method, tuna (checkpointing off / every block) beside PyTorch + PEFT with
gradient checkpointing. Prints a markdown table; writes <out>.md and <out>.svg beside the JSONL.

Run: python scripts/bench/memory_length_table.py target/bench/memory_length.jsonl
"""
import json
import math
import sys
from pathlib import Path


def load(path):
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["method"], r["seq"], r["side"])] = r
    return rows


def table(rows):
    keys = sorted({(m, s) for (m, s, _) in rows}, key=lambda k: (["prompt", "prefix", "lora", "full"].index(k[0])
                                                                  if k[0] in ["prompt", "prefix", "lora", "full"]
                                                                  else 9, k[1]))
    out = ["| method | tokens | tuna, off: peak / tok/s | tuna, every: peak / tok/s | plan predicted (every) | "
           "PyTorch + PEFT, checkpointing: peak / tok/s | peak every / PyTorch | time every / off |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, s in keys:
        off, every, pt = (rows.get((m, s, side)) for side in ("tuna-off", "tuna-every", "pytorch-gc"))

        def cell(r):
            if r is None:
                return "not run"
            if "error" in r:
                return "refused" if "does not work" in r["error"] else "failed"
            return f"{r['peak_rss_mb']:.0f} MiB / {r['tokens_per_s']:.0f}"

        pred = "-"
        if every and "predicted_mb" in every and every.get("predicted_mb"):
            err = every["peak_rss_mb"] / every["predicted_mb"] - 1
            pred = f"{every['predicted_mb']:.0f} MiB ({err:+.0%})"
        ratio = "-"
        if every and pt and "error" not in every and "error" not in pt:
            ratio = f"{every['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x"
        slow = "-"
        if every and off and "error" not in every and "error" not in off:
            slow = f"{off['tokens_per_s'] / every['tokens_per_s']:.2f}x"
        out.append(f"| {m} | {s} | {cell(off)} | {cell(every)} | {pred} | {cell(pt)} | {ratio} | {slow} |")
    return "\n".join(out)


def svg(rows):
    """Peak memory (MiB, log) against tokens (log2), one line per method and side."""
    w, h, left, right, top, bottom = 820, 420, 70, 240, 30, 50
    pts = [(m, s, side, r["peak_rss_mb"]) for (m, s, side), r in rows.items() if "peak_rss_mb" in r]
    if not pts:
        return ""
    xs = sorted({p[1] for p in pts})
    ys = [p[3] for p in pts]
    x0, x1 = math.log2(min(xs)), math.log2(max(xs))
    y0, y1 = math.log10(min(ys) * 0.8), math.log10(max(ys) * 1.25)
    px = lambda s: left + (math.log2(s) - x0) / max(x1 - x0, 1e-9) * (w - left - right)  # noqa: E731
    py = lambda v: top + (1 - (math.log10(v) - y0) / (y1 - y0)) * (h - top - bottom)  # noqa: E731
    colors = {"prompt": "#1f77b4", "prefix": "#ff7f0e", "lora": "#2ca02c", "full": "#d62728"}
    dash = {"tuna-off": "", "tuna-every": "6,3", "pytorch-gc": "2,3"}
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         '<rect width="100%" height="100%" fill="white"/>',
         f'<text x="{left}" y="18" font-size="14">Peak memory against sequence length (SmolLM2-135M, batch 1, CPU)</text>']
    for x in xs:
        s.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{h - bottom}" stroke="#ddd"/>')
        s.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x}</text>')
    for v in [256, 512, 1024, 2048, 4096, 8192, 16384]:
        if y0 <= math.log10(v) <= y1:
            s.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{w - right}" y2="{py(v):.1f}" stroke="#ddd"/>')
            s.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v // 1024 and f"{v / 1024:g} GiB" or f"{v} MiB"}</text>')
    s.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">tokens per sequence</text>')
    ly = top
    for m in ["prompt", "prefix", "lora", "full"]:
        for side in ["tuna-off", "tuna-every", "pytorch-gc"]:
            line = sorted((p[1], p[3]) for p in pts if p[0] == m and p[2] == side)
            if not line:
                continue
            d = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in line)
            s.append(f'<polyline points="{d}" fill="none" stroke="{colors.get(m, "#555")}" stroke-width="2" '
                     f'stroke-dasharray="{dash[side]}"/>')
            for a, b in line:
                s.append(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="3" fill="{colors.get(m, "#555")}"/>')
            s.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 40}" y2="{ly}" '
                     f'stroke="{colors.get(m, "#555")}" stroke-width="2" stroke-dasharray="{dash[side]}"/>')
            label = {"tuna-off": "tuna", "tuna-every": "tuna, checkpointed", "pytorch-gc": "PEFT, checkpointed"}[side]
            s.append(f'<text x="{w - right + 46}" y="{ly + 4}">{m}: {label}</text>')
            ly += 16
    s.append("</svg>")
    return "\n".join(s) + "\n"


def main():
    path = Path(sys.argv[1])
    rows = load(path)
    md = table(rows)
    print(md)
    path.with_suffix(".md").write_text(md + "\n")
    path.with_suffix(".svg").write_text(svg(rows))


if __name__ == "__main__":
    main()
