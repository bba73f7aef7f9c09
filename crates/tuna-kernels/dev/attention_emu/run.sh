#!/bin/sh
# CPU emulation of kernels/attention.cu (no GPU needed): one std::thread per CUDA thread, a shim
# of common.cuh, exact-size NaN-poisoned shared memory, ASan + UBSan; compares o, lse and every
# gradient with a double reference. Takes ~2 minutes on 2 cores. Usage: sh run.sh
set -e
here=$(cd "$(dirname "$0")" && pwd)
kern="$here/../../../../kernels"
work=$(mktemp -d)
cp "$here/common.cuh" "$here/main.cpp" "$work/"
for f in attention.cu attention_bwd.cuh; do
  sed -e 's/extern __shared__ float smem\[\];/float* smem = g_smem;/' \
      -e 's/__shared__ int key_ok_s/static int key_ok_s/' "$kern/$f" > "$work/$f"
done
g++ -std=c++20 -O1 -g -fsanitize=address,undefined -w -pthread -o "$work/emu" "$work/main.cpp"
"$work/emu"
