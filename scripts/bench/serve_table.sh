#!/usr/bin/env bash
# The multi-adapter serving benchmark, both sides in one run: N = 1, 4, 16 LoRA adapters (r 8 on
# q_proj and v_proj, random weights) on SmolLM2-135M, R requests of ~33 prompt tokens and NEW
# greedy tokens each (request i uses adapter i mod N), all sent at once.
#   tuna mixed    `tuna serve`, every request in one continuous batch (mixed-adapter forwards)
#   tuna grouped  `tuna serve`, one adapter's requests at a time (what a server without mixed
#                 batches can do)
#   tuna swap     `tuna serve --stepper swap`, a batch-of-one forward per sequence
#   peft switch   PyTorch + PEFT, per adapter `set_adapter` and one batched `generate`
#   peft mixed    PyTorch + PEFT, `generate(adapter_names=...)` over every request at once
# Prints JSON lines (scripts/bench/serve.sh and serve_peft.py) and the CPU model. f32 both sides,
# RAYON_NUM_THREADS / torch threads = THREADS (default 2).
# Run: scripts/bench/serve_table.sh [R] [NEW]   (needs `cargo build --release`, .assets from
#      scripts/fetch-assets.sh, and PYTHON with scripts/bench/requirements.txt installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-32} NEW=${2:-32} THREADS=${THREADS:-2}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x /root/venvs/tuna-golden/bin/python ]]; then PYTHON=/root/venvs/tuna-golden/bin/python; else PYTHON=python3; fi
fi
MODEL=.assets/SmolLM2-135M-Instruct.Q4_1.gguf
TUNA=target/release/tuna
[[ -x $TUNA ]] || { echo "build tuna first: cargo build --release" >&2; exit 1; }
[[ -f $MODEL ]] || { echo "$MODEL is missing: run scripts/fetch-assets.sh" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); threads $THREADS; $(date -u +%F)"
"$PYTHON" scripts/bench/serve_peft.py --adapters 16 --save "$work/adapters" 2>"$work/py.err" ||
  { cat "$work/py.err" >&2; exit 1; }
export RAYON_NUM_THREADS=$THREADS
for n in 1 4 16; do
  for mode in mixed grouped swap; do
    bash scripts/bench/serve.sh "$TUNA" "$MODEL" "$work/adapters" "$n" "$mode" "$R" "$NEW"
  done
  for mode in switch mixed; do
    "$PYTHON" scripts/bench/serve_peft.py --adapters "$n" --mode "$mode" --requests "$R" --batch "$R" \
      --prompt-len 33 --new-tokens "$NEW" --threads "$THREADS" 2>"$work/py.err" ||
      { cat "$work/py.err" >&2; exit 1; }
  done
done
