#!/usr/bin/env bash
# Training-step throughput and peak memory, tuna vs PyTorch + PEFT, on the CPU: full fine-tuning,
# prompt tuning, prefix tuning and LoRA at MiniLM and SmolLM2-135M shapes. Every (model, method,
# side) runs as a fresh process (peak RSS is that configuration's), with the same thread count,
# batch, sequence length and step count on both sides. Results go to a JSONL file; a markdown
# table is printed. Run on an idle machine: other load skews both sides (OpenMP worse than rayon).
#
#   scripts/bench/train_step.sh                 # defaults below, ~6-8 min on 2 cores
#   THREADS=4 SMOL_LAYERS=10 scripts/bench/train_step.sh
#
# Environment: THREADS (2), PYTHON (the tuna-golden venv if present, else python3; needs
# scripts/bench/requirements.txt), OUT (target/bench/train_step.jsonl), PEAK_GFLOPS (200),
# MINILM_BATCH/SEQ/STEPS/WARMUP (16/64/10/2), SMOL_BATCH/SEQ/STEPS/WARMUP (4/64/3/1),
# SMOL_LAYERS (30 = the real depth), METHODS ("full prompt prefix lora"), MODELS ("minilm smollm2"),
# SIDES ("tuna pytorch").
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=${THREADS:-2}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /root/venvs/tuna-golden/bin/python ]]; then PYTHON=/root/venvs/tuna-golden/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-target/bench/train_step.jsonl}
PEAK_GFLOPS=${PEAK_GFLOPS:-200}
METHODS=${METHODS:-full prompt prefix lora}
MODELS=${MODELS:-minilm smollm2}
SIDES=${SIDES:-tuna pytorch}
SMOL_LAYERS=${SMOL_LAYERS:-30}

echo "building the tuna bench (release)..." >&2
BIN=$(cargo build --release -p tuna-models --bench train_step --message-format=json 2>/dev/null |
    "$PYTHON" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
if [[ -z "$BIN" ]]; then
    cargo build --release -p tuna-models --bench train_step >&2 # show the error
    echo "no train_step executable" >&2
    exit 1
fi

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
start=$SECONDS
for model in $MODELS; do
    if [[ $model == minilm ]]; then
        args=(--batch "${MINILM_BATCH:-16}" --seq "${MINILM_SEQ:-64}" --steps "${MINILM_STEPS:-10}" --warmup "${MINILM_WARMUP:-2}")
    else
        args=(--batch "${SMOL_BATCH:-4}" --seq "${SMOL_SEQ:-64}" --steps "${SMOL_STEPS:-3}" --warmup "${SMOL_WARMUP:-1}" --layers "$SMOL_LAYERS")
    fi
    for method in $METHODS; do
        for side in $SIDES; do
            echo "[$((SECONDS - start))s] $model $method $side" >&2
            if [[ $side == tuna ]]; then
                RAYON_NUM_THREADS=$THREADS "$BIN" --model "$model" --method "$method" "${args[@]}" | tail -n 1 >>"$OUT"
            else
                OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PYTHON" scripts/bench/train_step.py \
                    --model "$model" --method "$method" "${args[@]}" --threads "$THREADS" 2>/dev/null | tail -n 1 >>"$OUT"
            fi
        done
    done
done
echo "[$((SECONDS - start))s] done; results in $OUT" >&2
echo
"$PYTHON" scripts/bench/train_step_table.py "$OUT" "$PEAK_GFLOPS"
