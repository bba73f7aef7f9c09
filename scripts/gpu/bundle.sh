#!/usr/bin/env bash
# Builds here (the CPU machine, with cargo) everything the GPU machine needs for
# scripts/gpu/check.sh, into the ignored folder gpu-bundle/:
#   bin/tuna                              the release CLI
#   tests/tuna-kernels-lib                tuna-kernels' lib tests (every kernel's CUDA-vs-CPU test)
#   tests/tuna-autograd-cuda              tuna-autograd --test cuda (with the bf16 tape's tests and the fused add + norm)
#   tests/tuna-models-cuda_models         tuna-models --test cuda_models (with every method in bf16)
#   tests/tuna-trainer-cuda_train         tuna-trainer --test cuda_train (training, every method)
#   bin/cuda_attention                    the attention benchmark (benches/cuda_attention.rs)
#   bin/train_step                        the training-step benchmark (crates/tuna-models/benches/train_step.rs)
#   scripts/attn_sdpa.py, attn_table.py   PyTorch SDPA at the same shapes, and the joined table
#   scripts/train_step.py, train_table.py PyTorch + PEFT training steps, and the joined table
#   fixtures/                             crates/tuna-models/tests/fixtures (read via TUNA_FIXTURES_DIR)
#   kernel-cache/                         every kernel compiled here by NVRTC 13.0 for sm_90 (the GPU
#                                         machines' arch and NVRTC), so the device compiles nothing
#   MANIFEST.txt                          commit, build date, files and sizes
# Release builds, symbols and debug info stripped (strip --strip-all), so the bundle stays well under the device tool's 64 MiB
# carry limit (checked: the script fails above it). The binaries carry the emulated CUDA device too
# (feature tuna-kernels/emulator; off unless TUNA_CUDA_EMULATE=1), and before it finishes the script
# runs the bundle's own CUDA test binaries and generate steps on it (check.sh --emulated), so a
# bundle that passes here fails on the GPU only for what the emulator cannot see. Then: one device
# run with carry ["gpu-bundle"] and command `bash scripts/gpu/check.sh $OUT/gpu` (see README.md,
# "### GPU").
set -euo pipefail
cd "$(dirname "$0")/../.."
LIMIT_MIB=64
B=gpu-bundle
rm -rf "$B"
mkdir -p "$B/bin" "$B/tests"

# `cargo ... --message-format=json` prints one JSON object per artifact; pick the executable of
# the wanted target. Arguments: <output name> <cargo args...>
build() {
  local name="$1"; shift
  local exe
  exe="$(cargo "$@" --release --features tuna-kernels/emulator --message-format=json-render-diagnostics | python3 -c '
import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")]
if len(exes) != 1:
    sys.exit("expected one executable, got %r" % exes)
print(exes[0])
')"
  echo "$name <- ${exe#"$PWD/"}"
  cp "$exe" "$B/$name"
  strip --strip-all "$B/$name"
}

build bin/tuna                      build -p tuna --bin tuna
build tests/tuna-kernels-lib        test --no-run -p tuna-kernels --lib
build tests/tuna-autograd-cuda      test --no-run -p tuna-autograd --test cuda
build tests/tuna-models-cuda_models test --no-run -p tuna-models --test cuda_models
build tests/tuna-trainer-cuda_train test --no-run -p tuna-trainer --test cuda_train
build bin/cuda_attention            test --no-run -p tuna-kernels --bench cuda_attention
build bin/train_step                test --no-run -p tuna-models --bench train_step
mkdir -p "$B/scripts"
cp scripts/gpu/attn_sdpa.py scripts/gpu/attn_table.py scripts/gpu/train_table.py scripts/bench/train_step.py "$B/scripts/"
cp -r crates/tuna-models/tests/fixtures "$B/fixtures"
# Every kernel for sm_90 with this machine's NVRTC 13.0 (scripts/install-nvrtc.sh), into the bundle.
if [ -d .nvrtc/nvidia/cu13/lib ]; then
  export LD_LIBRARY_PATH="$PWD/.nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
TUNA_KERNEL_CACHE="$PWD/$B/kernel-cache" cargo run --quiet --release -p tuna-kernels --example precompile -- 90

{
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!gpu-bundle' 2>/dev/null || echo '+dirty')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "rustc: $(rustc --version)"
  (cd "$B" && find . -type f ! -name MANIFEST.txt -printf '%s\t%P\n' | sort -k2)
} >"$B/MANIFEST.txt"

kib="$(du -sk "$B" | cut -f1)"
echo "gpu-bundle: $((kib / 1024)) MiB ($kib KiB; limit ${LIMIT_MIB} MiB for everything carried)"
du -sh "$B"/bin/* "$B"/tests/* "$B/fixtures"
if [ "$kib" -ge $((LIMIT_MIB * 1024)) ]; then
  echo "gpu-bundle is over ${LIMIT_MIB} MiB: the device tool will not carry it" >&2
  exit 1
fi
# The plan, and a strict check that check.sh finds every file it needs.
bash scripts/gpu/check.sh /tmp/tuna-gpu-dry-run --dry-run --strict >/dev/null
echo "check.sh --dry-run --strict: the bundle is complete"
# The bundle's CUDA steps on the emulated device (a few minutes on 2 cores).
rm -rf /tmp/tuna-gpu-emulated
bash scripts/gpu/check.sh /tmp/tuna-gpu-emulated --emulated
