#!/usr/bin/env bash
# Peak memory and tokens/s against sequence length on the CPU (SmolLM2-135M, batch 1): `tuna
# train` with activation checkpointing off and every block, beside PyTorch + PEFT with gradient
# checkpointing on (transformers' non-reentrant checkpointing; where PEFT refuses, the refusal is
# the row). tuna's full fine-tuning runs with the optimizer inside the backward and bf16 moments
# (`--update-in-backward --optimizer-state bf16`); PyTorch's with its default AdamW. Every run is
# a fresh process (peak RSS is that run's). Each tuna run also records the memory plan's
# prediction beside its measured peak. Results go to a JSONL file; a markdown table and an SVG plot
# are written beside it.
#
#   scripts/bench/memory_length.sh                        # ~40-60 min on 2 cores
#   LENGTHS="256 1024" METHODS=lora scripts/bench/memory_length.sh
#
# Environment: THREADS (2), LENGTHS ("256 1024 4096"), METHODS ("prompt prefix lora full"), SIDES
# ("tuna-off tuna-every pytorch-gc"), STEPS (2), PYTHON (the tuna-golden venv if present, else
# python3), OUT (target/bench/memory_length.jsonl). Needs .assets (scripts/fetch-assets.sh): the
# SmolLM2 GGUF and the polarity sentences, joined here into long documents for a language-model task.
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=${THREADS:-2}
LENGTHS=${LENGTHS:-256 1024 4096}
METHODS=${METHODS:-prompt prefix lora full}
SIDES=${SIDES:-tuna-off tuna-every pytorch-gc}
STEPS=${STEPS:-2}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /root/venvs/tuna-golden/bin/python ]]; then PYTHON=/root/venvs/tuna-golden/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-target/bench/memory_length.jsonl}
MODEL=.assets/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -f $MODEL ]] || { echo "$MODEL missing: run scripts/fetch-assets.sh" >&2; exit 1; }

cargo build --release --bin tuna >&2
WORK=$(mktemp -d /tmp/tuna-memlen.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# A copy: a rebuild during the runs does not change the binary under them.
BIN=$WORK/tuna
cp target/release/tuna "$BIN"
# Long documents (about 60,000 characters each) from the polarity sentences, for `--task lm`.
"$PYTHON" - "$WORK/long.jsonl" <<'PY'
import json, sys
rows = [json.loads(l)["text"] for l in open(".assets/polarity/train.jsonl")]
with open(sys.argv[1], "w") as f:
    k = 0
    for _ in range(8):
        doc, n = [], 0
        while n < 60000:
            doc.append(rows[k % len(rows)]); n += len(doc[-1]); k += 1
        f.write(json.dumps({"text": " ".join(doc)}) + "\n")
PY

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
grep -m1 'model name' /proc/cpuinfo >&2 || true
start=$SECONDS
for len in $LENGTHS; do
    for method in $METHODS; do
        for side in $SIDES; do
            echo "[$((SECONDS - start))s] $len $method $side" >&2
            case $side in
            tuna-*)
                policy=${side#tuna-}
                extra=()
                [[ $method == full ]] && extra=(--update-in-backward --optimizer-state bf16)
                dir=$WORK/run
                rm -rf "$dir"
                if RAYON_NUM_THREADS=$THREADS "$BIN" train --model "$MODEL" --train "$WORK/long.jsonl" --task lm \
                    --max-len "$len" --method "$method" --batch-size 1 --steps "$STEPS" --warmup 0 --clip 0 \
                    --checkpoint-activations "$policy" --out "$dir" --quiet --no-memory-check "${extra[@]}" \
                    >"$WORK/log" 2>&1; then
                    "$PYTHON" - "$dir/summary.json" "$side" "$len" >>"$OUT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"side": sys.argv[2], "method": s["method"], "seq": int(sys.argv[3]),
                  "tokens_per_s": round(s["tokens_per_s"], 2), "peak_rss_mb": round(s["peak_rss_bytes"] / 2**20, 1),
                  "predicted_mb": round((s.get("predicted_peak_bytes") or 0) / 2**20, 1),
                  "heap_mb": round((s.get("peak_heap_bytes") or 0) / 2**20, 1)}))
PY
                else
                    err=$(tail -n 3 "$WORK/log" | tr '\n' ' ')
                    "$PYTHON" -c 'import json,sys; print(json.dumps({"side": sys.argv[1], "method": sys.argv[2], "seq": int(sys.argv[3]), "error": sys.argv[4]}))' \
                        "$side" "$method" "$len" "$err" >>"$OUT"
                fi
                ;;
            pytorch-gc)
                OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PYTHON" scripts/bench/train_step.py --model smollm2 \
                    --method "$method" --batch 1 --seq "$len" --steps $((STEPS - 1)) --warmup 1 --threads "$THREADS" \
                    --grad-ckpt 2>/dev/null | tail -n 1 | "$PYTHON" -c 'import json,sys
r = json.loads(sys.stdin.read()); r["side"] = "pytorch-gc"; print(json.dumps(r))' >>"$OUT" || true
                ;;
            esac
        done
    done
done
echo "[$((SECONDS - start))s] done; results in $OUT" >&2
"$PYTHON" scripts/bench/memory_length_table.py "$OUT"
