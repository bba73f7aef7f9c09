#!/usr/bin/env bash
# Installs NVRTC 13.0 and the CUDA 13.0 headers from PyPI into .nvrtc/ (ignored), idempotently.
# The kernel compile check loads libnvrtc from .nvrtc/nvidia/cu13/lib. No GPU or driver needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .nvrtc/nvidia/cu13/lib/libnvrtc.so* >/dev/null 2>&1; then
  echo "NVRTC already in .nvrtc/"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --target .nvrtc \
  "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
ls .nvrtc/nvidia/cu13/lib/libnvrtc.so* >/dev/null
echo "NVRTC installed in .nvrtc/"
