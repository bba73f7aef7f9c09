#!/usr/bin/env bash
# The test command: builds the workspace and runs every test with cargo-nextest (cargo test where
# nextest is missing), then every example of examples/. CUDA tests without a GPU skip by name:
# the list is printed at the end, with the kernel compile report (registers, spills, shared
# memory per kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .nvrtc/nvidia/cu13/lib ]; then
  export LD_LIBRARY_PATH="$PWD/.nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
mkdir -p target
export TUNA_SKIP_LOG="$PWD/target/skipped-tests.txt"
export TUNA_KERNEL_REPORT="$PWD/target/kernel-report.txt"
rm -f "$TUNA_SKIP_LOG" "$TUNA_KERNEL_REPORT"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests (the README's examples are doctests): run them first, so the
  # runner's last summary is nextest's
  cargo test --workspace --doc || status=$?
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi
# The root package's examples (examples/*.rs), each run to completion: a failing one fails the
# command. fused_kernel's CUDA half skips by name without a GPU (listed below with the tests').
for f in examples/*.rs; do
  ex=$(basename "$f" .rs)
  echo "== cargo run --example $ex =="
  cargo run --quiet --example "$ex" || { echo "FAILED: example $ex"; status=1; }
done
if [ -f "$TUNA_KERNEL_REPORT" ]; then
  echo "== kernel compile report (NVRTC, ptxas -v) =="
  cat "$TUNA_KERNEL_REPORT"
fi
if [ -f "$TUNA_SKIP_LOG" ]; then
  echo "== $(wc -l < "$TUNA_SKIP_LOG") tests or examples skipped their CUDA or NVRTC work (the runner counts them as passed), by name =="
  sort "$TUNA_SKIP_LOG"
fi
exit "$status"
