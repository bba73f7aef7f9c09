#!/usr/bin/env bash
# The test command: builds the workspace and runs every test with cargo-nextest (cargo test where
# nextest is missing), then every example of examples/. The CUDA tests run on the emulated CUDA
# device (kernels/*.cu compiled as host C++, the `emulator` feature of tuna-kernels, selected by
# TUNA_CUDA_EMULATE=1; set TUNA_CUDA_EMULATE=0 on a machine with a GPU to test the real one).
# Printed at the end: which kernels ran on the emulated device, the kernel compile report
# (NVRTC: registers, spills, shared memory per kernel) and any test that skipped, by name.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .nvrtc/nvidia/cu13/lib ]; then
  export LD_LIBRARY_PATH="$PWD/.nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
mkdir -p target
export TUNA_SKIP_LOG="$PWD/target/skipped-tests.txt"
export TUNA_KERNEL_REPORT="$PWD/target/kernel-report.txt"
export TUNA_CUDA_EMULATE="${TUNA_CUDA_EMULATE:-1}"
export TUNA_EMU_LAUNCH_LOG="$PWD/target/emu-launches.txt"
rm -f "$TUNA_SKIP_LOG" "$TUNA_KERNEL_REPORT" "$TUNA_EMU_LAUNCH_LOG" "$TUNA_EMU_LAUNCH_LOG.kernels"
# The tests' scratch folders (runs, exports, model copies: about 1 GB a full run, one folder per
# test process, kept for a look after a failure) go under target/test-tmp, emptied here at the
# start of each run, instead of piling up in /tmp.
export TMPDIR="$PWD/target/test-tmp"
rm -rf "$TMPDIR"
mkdir -p "$TMPDIR"
features=(--features tuna-kernels/emulator)
status=0
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests (the README's examples are doctests): run them first, so the
  # runner's last summary is nextest's
  cargo test --workspace "${features[@]}" --doc || status=$?
  cargo nextest run --workspace "${features[@]}" --no-fail-fast "$@" || status=$?
else
  cargo test --workspace "${features[@]}" --no-fail-fast "$@" || status=$?
fi
# The root package's examples (examples/*.rs), each run to completion: a failing one fails the
# command. fused_kernel's CUDA half skips by name without a GPU (listed below with the tests').
# An example that works on a folder the user names (a line `//! test.sh: build only` in it) is
# built, not run.
for f in examples/*.rs; do
  ex=$(basename "$f" .rs)
  if grep -q '^//! test.sh: build only' "$f"; then
    echo "== cargo build --example $ex (it needs arguments) =="
    cargo build --quiet "${features[@]}" --example "$ex" || { echo "FAILED: example $ex"; status=1; }
    continue
  fi
  echo "== cargo run --example $ex =="
  cargo run --quiet "${features[@]}" --example "$ex" || { echo "FAILED: example $ex"; status=1; }
done
# The low-precision bases' dot-product paths as a CPU with VNNI / AMX / AVX512_BF16 takes them by
# default, on their portable twins (the int8 twin gives the hardware paths' bits): the suites whose
# bounds depend on the path, again (on such a CPU, the run above took those paths already).
echo "== the low-precision suites on the dot-product paths' portable twins (TUNA_CPU_MATRIX=emulated) =="
lowp_env=(env TUNA_CPU_MATRIX=emulated TUNA_CPU_MATRIX_BF16=emulated)
if cargo nextest --version >/dev/null 2>&1; then
  # --workspace, as above: the same build, nothing recompiled.
  "${lowp_env[@]}" cargo nextest run --workspace "${features[@]}" --no-fail-fast \
    -E 'test(/lowp::|q4/) | binary(base_precision)' || status=$?
else
  "${lowp_env[@]}" cargo test "${features[@]}" -p tuna-kernels --lib lowp:: || status=$?
  "${lowp_env[@]}" cargo test "${features[@]}" -p tuna-models q4 || status=$?
  "${lowp_env[@]}" cargo test "${features[@]}" -p tuna-models --test base_precision || status=$?
fi
# The emulated device again under AddressSanitizer and UBSan (emulator objects built with
# -fsanitize=address,undefined, the test binaries run with ASan's runtime preloaded): the emulator's
# own tests and every kernel's CUDA-vs-CPU test. Its own target folder, so the main build is not
# rebuilt afterwards.
echo "== emulated CUDA device under ASan + UBSan: emu_core and the kernels' CUDA tests =="
host=$(rustc -vV | sed -n 's/^host: //p')
runner_var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUNNER"
if [[ "$(${TUNA_EMU_CXX:-c++} -print-file-name=libasan.so 2>/dev/null)" == /* ]]; then
  asan=(env TUNA_EMU_SANITIZE=1 CARGO_TARGET_DIR="$PWD/target/asan"
    "$runner_var=$PWD/crates/tuna-kernels/emu/asan-run.sh")
  "${asan[@]}" cargo test -q -p tuna-kernels "${features[@]}" --test emu_core || status=$?
  "${asan[@]}" cargo test -q -p tuna-kernels "${features[@]}" --lib cuda || status=$?
  # The tensor-core attention kernels' tests (named tc_*, not *cuda*).
  "${asan[@]}" cargo test -q -p tuna-kernels "${features[@]}" --lib tc_ || status=$?
else
  echo "SKIPPED the sanitized emulator run: ${TUNA_EMU_CXX:-c++} has no libasan.so" | tee -a "$TUNA_SKIP_LOG"
fi
if [ -f "$TUNA_EMU_LAUNCH_LOG.kernels" ]; then
  total=$(grep -c . "$TUNA_EMU_LAUNCH_LOG.kernels")
  ran=$(cut -d' ' -f1 "$TUNA_EMU_LAUNCH_LOG" | sort -u | grep -c .)
  configs=$(sort -u "$TUNA_EMU_LAUNCH_LOG" | grep -c .)
  echo "== emulated CUDA device: $ran of $total kernels ran through their launchers, in $configs launch configurations (kernel, block, shared memory) =="
  never=$(cut -d' ' -f1 "$TUNA_EMU_LAUNCH_LOG" | sort -u | comm -13 - <(sort -u "$TUNA_EMU_LAUNCH_LOG.kernels"))
  if [ -n "$never" ]; then
    echo "never launched:"
    echo "$never" | sed 's/^/  /'
  fi
fi
if [ -f "$TUNA_KERNEL_REPORT" ]; then
  echo "== kernel compile report (NVRTC, ptxas -v) =="
  cat "$TUNA_KERNEL_REPORT"
fi
if [ -f "$TUNA_SKIP_LOG" ]; then
  echo "== $(wc -l < "$TUNA_SKIP_LOG") tests or examples skipped their CUDA or NVRTC work (the runner counts them as passed), by name =="
  sort "$TUNA_SKIP_LOG"
fi
exit "$status"
