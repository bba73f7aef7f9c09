#!/bin/sh
# Runs a binary that links the emulator built with TUNA_EMU_SANITIZE=1 (ASan + UBSan), with the
# ASan runtime preloaded: ASan must come first in the process's library list, and a Rust binary
# (which links the sanitizer runtimes as ordinary shared libraries) cannot arrange that itself.
# Use it as cargo's runner, so that only the test binaries run under it (not cargo, rustc or
# build scripts):
#
#   TUNA_EMU_SANITIZE=1 CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/crates/tuna-kernels/emu/asan-run.sh \
#     cargo test -p tuna-kernels --features emulator --test emu_core
#
# TUNA_EMU_CXX names the compiler whose runtime to preload (default c++, as build.rs).
# Leak checking is off (Rust's test harness leaks by design); any ASan or UBSan report aborts.
set -e
cxx=${TUNA_EMU_CXX:-c++}
asan=$($cxx -print-file-name=libasan.so)
case "$asan" in
  /*) ;;
  *) echo "asan-run.sh: $cxx does not know libasan.so (got '$asan')" >&2; exit 2 ;;
esac
export LD_PRELOAD="$asan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
exec "$@"
