#!/usr/bin/env bash
# Every CUDA check in one run on the GPU machine (no cargo, no network there): run from the repo
# root with gpu-bundle/ (made here by scripts/gpu/bundle.sh) carried along.
#
#   bash scripts/gpu/check.sh <out-dir>                    # on the GPU machine, e.g. $OUT/gpu
#   bash scripts/gpu/check.sh <out-dir> --dry-run          # anywhere: print the plan, check the bundle
#   bash scripts/gpu/check.sh <out-dir> --dry-run --strict # the same, exit 1 if the bundle is incomplete
#   bash scripts/gpu/check.sh <out-dir> --emulated         # here: the test and generate steps on the
#                                                          # emulated CUDA device (TUNA_CUDA_EMULATE=1)
#
# Steps: nvidia-smi and `tuna info` (into env.txt); each test binary that holds CUDA tests, with
# TUNA_REQUIRE_CUDA=1 (a CUDA test that cannot run fails instead of skipping): the kernels' whole,
# the others with the libtest filter `cuda`; `tuna generate --device cuda` on the tiny GPT-2 and Llama fixtures. Each step has a
# time cap (the caps sum to 590 s, under the device's 600 s a call; a passing run takes about half); a PASS/FAIL table is
# printed last and written to
# <out-dir>/summary.txt. Exit status: 0 when every step passed, 1 otherwise, 2 on a usage error.
#
# Files written to <out-dir> (the device tool brings back at most 8 files, 2 folders down):
# summary.txt (the PASS/FAIL table and the attention table), logs.tar.gz (env.txt, one log per test
# binary, generate.log, bench.log with every benchmark JSON line, attention.md), and
# kernel-cache.tar.gz (the NVRTC cubins compiled during the run; TUNA_KERNEL_CACHE points at
# <out-dir>/kernel-cache, packed at the end).
#
# <out-dir> is resolved from the caller's folder and must be new or empty (the run refuses
# otherwise: it packs and removes the logs it writes there). The dry run writes nothing. It always lists the whole plan, and reports the bundle's missing
# files by name; it exits 0 even when files are missing (it is a plan, and the workspace test runs
# it without a bundle), unless --strict is given (bundle.sh runs it so).
#
# Then the attention benchmark against PyTorch SDPA (benches/cuda_attention.rs, scripts/gpu/attn_sdpa.py)
# and the training-step benchmark against PyTorch + PEFT (crates/tuna-models/benches/train_step.rs,
# scripts/bench/train_step.py; GPT-2 small shape), each with its table.
set -uo pipefail

usage() { echo "usage: $0 <out-dir> [--dry-run [--strict] | --emulated]" >&2; exit 2; }
out="" dry=0 strict=0 emulated=0
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --strict) strict=1 ;;
    --emulated) emulated=1 ;;
    -*) usage ;;
    *) [ -z "$out" ] || usage; out="$a" ;;
  esac
done
[ -n "$out" ] || usage
[ "$strict" = 0 ] || [ "$dry" = 1 ] || usage
[ "$emulated" = 0 ] || [ "$dry" = 0 ] || usage

# Paths given relative to where the script is called from, before moving to the repo root.
out="$(realpath -m "$out")"
[ -z "${TUNA_GPU_BUNDLE:-}" ] || TUNA_GPU_BUNDLE="$(realpath -m "$TUNA_GPU_BUNDLE")"
cd "$(dirname "$0")/../.." || exit 2
root="$PWD"
bundle="$(realpath -m "${TUNA_GPU_BUNDLE:-$root/gpu-bundle}")" # TUNA_GPU_BUNDLE: another bundle (tests)

# The test binaries: "<log name>|<path in the bundle>|<time cap, s>|<libtest filter>". The kernels'
# binary runs whole (no filter): many of its CUDA tests sit in modules not named cuda (the
# tensor-core attention's, the device checks', the kernels' own), and its CPU tests take seconds.
# The others run with `cuda` (the bf16 tape's and bf16 models' tests are modules named cuda_* of
# the autograd and models binaries). bundle.sh writes these names.
TESTS=(
  "tuna-kernels-lib|tests/tuna-kernels-lib|70|"
  "tuna-autograd-cuda|tests/tuna-autograd-cuda|45|cuda"
  "tuna-models-cuda_models|tests/tuna-models-cuda_models|55|cuda"
  "tuna-trainer-cuda_train|tests/tuna-trainer-cuda_train|35|cuda"
)
TUNA="$bundle/bin/tuna"
# PyTorch's Python on the GPU machine (TUNA_PYTHON overrides).
PY="${TUNA_PYTHON:-python3}"
for p in /opt/torch/.venv/bin/python; do [ -z "${TUNA_PYTHON:-}" ] && [ -x "$p" ] && PY="$p"; done
FIXTURES="$bundle/fixtures"
GENERATE_MODELS=(gpt2 llama)

# CUDA 13.0's libraries on the GPU machine (NVRTC, cuBLAS); the driver's libcuda is on the
# loader's default path there. PyTorch's pip-installed CUDA 13 libraries are a last resort.
lib_dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
  [ -d "$d" ] && lib_dirs+=("$d")
done
if [ "$dry" = 1 ] && [ ${#lib_dirs[@]} = 0 ]; then
  lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
fi
ld_path="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

ENV_VARS=(
  "LD_LIBRARY_PATH=$ld_path"
  "TUNA_REQUIRE_CUDA=1"
  "TUNA_CUDA_EMULATE=$emulated"
  "TUNA_KERNEL_CACHE=$out/kernel-cache"
  "TUNA_FIXTURES_DIR=$FIXTURES"
  "TUNA_SKIP_LOG=$out/skipped.txt"
  "RUST_BACKTRACE=1"
)

# ---- the bundle ----
required=("$TUNA" "$bundle/bin/cuda_attention" "$bundle/bin/train_step")
for f in attn_sdpa.py attn_table.py train_step.py train_table.py; do required+=("$bundle/scripts/$f"); done
for t in "${TESTS[@]}"; do IFS='|' read -r _ rel _ <<<"$t"; required+=("$bundle/$rel"); done
for m in "${GENERATE_MODELS[@]}"; do required+=("$FIXTURES/$m/config.json"); done
missing=()
for f in "${required[@]}"; do [ -f "$f" ] || missing+=("${f#"$root/"}"); done

# ---- the plan: one line per step, "<name>|<cap s>|<log file>|<command>" ----
q() { local s; s="$(printf '%q ' "$@")"; printf '%s' "${s% }"; }
STEPS=()
if [ "$emulated" = 0 ]; then # the real device's facts
  STEPS+=("nvidia-smi|15|env.txt|nvidia-smi")
  STEPS+=("tuna-info|15|env.txt|$(q "$TUNA" info)")
fi
# On the emulated device (--emulated) every cap is 6x: kernels run as host C++ on 2 cores.
scale=$((emulated ? 6 : 1))
for t in "${TESTS[@]}"; do
  IFS='|' read -r name rel cap filter <<<"$t"
  STEPS+=("$name|$((cap * scale))|$name.log|$(q "$bundle/$rel" ${filter:+"$filter"} --test-threads=4)")
done
for m in "${GENERATE_MODELS[@]}"; do
  STEPS+=("generate-$m-cuda|15|generate.log|$(q "$TUNA" generate --model "$FIXTURES/$m" --prompt "hello world" --max-new-tokens 8 --device cuda)")
done
# Attention against PyTorch SDPA (bf16; FlashAttention-2 backend without a prefix): JSON lines into
# bench.log, then the joined table (also appended to summary.txt).
if [ "$emulated" = 0 ]; then # the benchmarks: a real GPU only
STEPS+=("bench-attention-tuna|35|bench.log|$(q "$bundle/bin/cuda_attention")")
STEPS+=("bench-attention-sdpa|30|bench.log|$(q "$PY" "$bundle/scripts/attn_sdpa.py")")
STEPS+=("attention-table|10|attention.md|$(q "$PY" "$bundle/scripts/attn_table.py" "$out/bench.log" "$out/bench.log")")
# Training steps of a GPT-2-small-shaped model (random weights), 8 x 1024 tokens, tuna against
# PyTorch + PEFT eager (f32 on both sides): full fine-tuning, and prompt tuning at 8 x 1004 (the 20
# virtual tokens fill the 1024 learned positions); then full fine-tuning with TF32 matmuls on both
# sides (`--tf32`); the caps keep the whole plan under the device's 600 s a call. JSON lines into
# train.log, then the table.
# Then both methods in bf16 mixed precision: tuna's --precision bf16 (bf16 activations and frozen
# weights, f32 masters) beside PyTorch's bf16 autocast.
for m in "full|1024|25|f32" "prompt|1004|25|f32" "full|1024|20|tf32" "full|1024|20|bf16" "prompt|1004|20|bf16"; do
  IFS='|' read -r meth seq cap kind <<<"$m"
  sfx="" tuna_flags=() peft_flags=()
  case "$kind" in
    tf32) sfx=-tf32 tuna_flags=(--tf32) peft_flags=(--tf32) ;;
    bf16) sfx=-bf16 tuna_flags=(--precision bf16) peft_flags=(--autocast bf16) ;;
  esac
  STEPS+=("bench-train-tuna-$meth$sfx|$cap|train.log|$(q "$bundle/bin/train_step" --device cuda --model gpt2 --method "$meth" --batch 8 --seq "$seq" --steps 5 --warmup 2 "${tuna_flags[@]}")")
  STEPS+=("bench-train-peft-$meth$sfx|$cap|train.log|$(q "$PY" "$bundle/scripts/train_step.py" --device cuda --model gpt2 --method "$meth" --batch 8 --seq "$seq" --steps 5 --warmup 2 "${peft_flags[@]}")")
done
STEPS+=("train-table|10|train.md|$(q "$PY" "$bundle/scripts/train_table.py" "$out/train.log")")
fi

if [ "$dry" = 1 ]; then
  echo "GPU check plan (dry run; nothing is run or written)"
  echo "repo root: $root"
  echo "out dir:   $out"
  echo "environment:"
  for v in "${ENV_VARS[@]}"; do echo "  export $(q "$v")"; done
  i=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap log cmd <<<"$s"
    i=$((i + 1))
    echo "step $i: $name (cap ${cap}s, log $out/$log)"
    echo "  \$ timeout $cap $cmd"
  done
  echo "step $((i + 1)): pack the kernel cache and the logs (the device tool brings back at most 8 files)"
  echo "  \$ tar -C $(q "$out") -czf $(q "$out/kernel-cache.tar.gz") kernel-cache && rm -rf $(q "$out/kernel-cache")"
  echo "  \$ tar -C $(q "$out") -czf $(q "$out/logs.tar.gz") *.log *.md env.txt skipped.txt"
  echo "then: the PASS/FAIL table, also in $out/summary.txt; exit 1 if any step failed"
  if [ ${#missing[@]} = 0 ]; then
    echo "bundle: complete ($(du -sh "$bundle" | cut -f1) in ${bundle#"$root/"})"
  else
    echo "bundle: MISSING ${#missing[@]} file(s) in $bundle (make them with: bash scripts/gpu/bundle.sh):"
    for f in "${missing[@]}"; do echo "  missing: $f"; done
    [ "$strict" = 1 ] && exit 1
  fi
  exit 0
fi

# ---- the real run ----
if [ ${#missing[@]} != 0 ]; then
  echo "gpu check: the bundle is incomplete; run 'bash scripts/gpu/bundle.sh' on the build machine and carry gpu-bundle" >&2
  for f in "${missing[@]}"; do echo "  missing: $f" >&2; done
  exit 1
fi
# A fresh folder only: the run appends to its logs, reads its verdicts from them and packs and
# removes them at the end, so it must not meet files it did not write.
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "gpu check: $out is not empty; give a new or empty folder (its logs are packed and removed at the end)" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
for v in "${ENV_VARS[@]}"; do export "${v?}"; done
# The kernels the bundle precompiled (NVRTC 13.0, sm_90): the run loads them instead of compiling.
if [ -d "$bundle/kernel-cache" ]; then
  mkdir -p "$out/kernel-cache" && cp "$bundle/kernel-cache"/* "$out/kernel-cache/" 2>/dev/null
fi
rm -f "$out/skipped.txt"
chmod u+x "$TUNA" "$bundle"/tests/* 2>/dev/null
start_all=$SECONDS
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "bundle: $(cat "$bundle/MANIFEST.txt" 2>/dev/null | head -3 | tr '\n' ' ')"
  for v in "${ENV_VARS[@]}"; do echo "env: $v"; done
  echo "libnvrtc: $(ls "${lib_dirs[@]/%//libnvrtc.so*}" 2>/dev/null | tr '\n' ' ')"
} >"$out/env.txt"

results=()
fails=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name cap log cmd <<<"$s"
  echo "== $name: $cmd" | tee -a "$out/$log"
  t0=$SECONDS
  eval "timeout --kill-after=10 $cap $cmd" >>"$out/$log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  verdict=PASS note=""
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    verdict=FAIL note="timed out after ${cap}s"
  elif [ $rc != 0 ]; then
    verdict=FAIL note="exit $rc"
  fi
  if [ "$log" = "$name.log" ]; then # a test binary: add libtest's count; no test run is a failure
    summary="$(grep -E '^test result:' "$out/$log" | tail -1 |
      sed -e 's/^test result: //' -e 's/; 0 ignored//' -e 's/; 0 measured//' -e 's/; finished in .*//')"
    note="${note:+$note; }${summary:-no test result line}"
    if [ $verdict = PASS ] && ! grep -qE '^test result: ok\. [1-9]' "$out/$log"; then
      verdict=FAIL note="no test matched the filter; $note"
    fi
  fi
  [ $verdict = FAIL ] && fails=$((fails + 1))
  echo "   $verdict in ${dt}s ${note}"
  results+=("$(printf '%-26s %-4s %5ss  %s' "$name" "$verdict" "$dt" "$note")")
done

if [ -d "$out/kernel-cache" ]; then
  tar -C "$out" -czf "$out/kernel-cache.tar.gz" kernel-cache && rm -rf "$out/kernel-cache"
fi

{
  echo
  echo "== $([ "$emulated" = 1 ] && echo 'emulated CUDA device' || echo GPU) check summary ($(head -1 "$out/env.txt" | cut -d' ' -f2), $((SECONDS - start_all))s) =="
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  printf '%-26s %-4s %6s  %s\n' step result time note
  for r in "${results[@]}"; do echo "$r"; done
  if [ -s "$out/skipped.txt" ]; then
    echo "skipped (should be none with TUNA_REQUIRE_CUDA=1): $(wc -l <"$out/skipped.txt")"
    sed 's/^/  /' "$out/skipped.txt"
  fi
  if [ $fails = 0 ]; then echo "ALL PASS"; else echo "$fails step(s) FAILED: logs in $out/logs.tar.gz"; fi
  if [ -s "$out/attention.md" ]; then
    echo
    echo "attention vs PyTorch SDPA (bf16, 16k tokens per batch; TFLOP/s as FlashAttention counts):"
    grep '^|' "$out/attention.md"
  fi
  if [ -s "$out/train.md" ]; then
    echo
    echo "training steps, GPT-2 small shape, f32, vs PyTorch + PEFT eager (MFU against the bf16 dense peak):"
    grep '^|' "$out/train.md"
  fi
} | tee "$out/summary.txt"
# The device tool brings back at most 8 files: the logs travel as one archive.
# (The folder was empty at the start: every log, table and env file here is this run's.)
(cd "$out" && logs=($(ls *.log *.md env.txt skipped.txt 2>/dev/null)) && tar -czf logs.tar.gz -- "${logs[@]}" && rm -f -- "${logs[@]}")
[ $fails = 0 ]
