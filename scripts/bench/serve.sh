#!/usr/bin/env bash
# tuna's side of the multi-adapter serving benchmark: `tuna serve` on a model with N LoRA adapters,
# R requests sent at once by concurrent HTTP clients (request i uses adapter i mod N), greedy,
# --new max tokens each. Prints one JSON line: generated tokens (from /metrics; a request may end
# early on the end-of-sequence token), wall seconds, tokens/s, and how many token steps were
# decoded in shared mixed-adapter forwards.
#
# Modes: mixed   the mixed stepper, every request at once (one batch, any mix of adapters);
#        swap    the swap stepper, every request at once (a batch-of-one forward per sequence);
#        grouped the mixed stepper, one adapter at a time: that adapter's requests at once, the
#                next adapter's after they all finish (a server batching one adapter at a time).
#
# Run: scripts/bench/serve.sh TUNA MODEL ADAPTERS_DIR N MODE [REQUESTS] [NEW] [MAX_BATCH] [PORT]
#   ADAPTERS_DIR holds adapter folders a0 .. a(N-1) (PEFT LoRA folders or tuna runs).
#   Threads: RAYON_NUM_THREADS (default 2).
set -euo pipefail
TUNA=$1 MODEL=$2 ADIR=$3 N=$4 MODE=$5 R=${6:-32} NEW=${7:-32} MB=${8:-32} PORT=${9:-18471}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/adapters"
for ((i = 0; i < N; i++)); do ln -s "$(realpath "$ADIR/a$i")" "$work/adapters/a$i"; done
stepper=mixed
[ "$MODE" = swap ] && stepper=swap
"$TUNA" serve --model "$MODEL" --adapters "$work/adapters" --port "$PORT" --max-batch "$MB" \
  --max-queue 1024 --max-new-tokens "$NEW" --stepper "$stepper" >"$work/out" 2>"$work/err" &
pid=$!
url=http://127.0.0.1:$PORT
for _ in $(seq 600); do curl -sf "$url/health" >/dev/null 2>&1 && break; sleep 0.1; done
# About 32 tokens of prompt (SmolLM2's tokenizer); the same text for every request.
prompt="The history of the city begins with a small fishing village on the river, where traders from the north came each summer to sell furs and buy salt, grain and"
req() { # adapter
  curl -sf -m 600 "$url/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"$1\", \"prompt\": \"$prompt\", \"max_tokens\": $NEW, \"temperature\": 0}" >/dev/null
}
metric() { curl -sf "$url/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
req a0 # warm-up
g0=$(metric tuna_generated_tokens_total) b0=$(metric tuna_batched_rows_total) p0=$(metric tuna_prompt_tokens_total)
t0=$(date +%s.%N)
# Each client's pid waited for by itself (a bare `wait` would also wait for the server), and any
# failed request fails the run (a partial run's tokens/s would mislead).
failed=0
collect() { for p in "$@"; do wait "$p" || failed=$((failed + 1)); done; }
if [ "$MODE" = grouped ]; then
  for ((a = 0; a < N && a < R; a++)); do
    clients=()
    for ((i = a; i < R; i += N)); do req "a$a" & clients+=($!); done
    collect "${clients[@]}"
  done
else
  clients=()
  for ((i = 0; i < R; i++)); do req "a$((i % N))" & clients+=($!); done
  collect "${clients[@]}"
fi
if [ "$failed" -gt 0 ]; then
  echo "serve.sh: $failed of $R requests failed; server stderr:" >&2
  tail -5 "$work/err" >&2
  exit 1
fi
t1=$(date +%s.%N)
g1=$(metric tuna_generated_tokens_total) b1=$(metric tuna_batched_rows_total) p1=$(metric tuna_prompt_tokens_total)
python3 -c "
g, s = $g1 - $g0, $t1 - $t0
print('{\"side\": \"tuna\", \"mode\": \"$MODE\", \"adapters\": $N, \"requests\": $R, \"max_batch\": $MB, '
      f'\"prompt_tokens\": {($p1 - $p0) / $R:.0f}, \"new_tokens\": $NEW, \"generated\": {g:.0f}, '
      f'\"batched_rows\": {$b1 - $b0:.0f}, \"threads\": $RAYON_NUM_THREADS, \"seconds\": {s:.3f}, \"tokens_per_s\": {g / s:.2f}}}')"
