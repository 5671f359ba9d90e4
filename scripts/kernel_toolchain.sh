#!/usr/bin/env bash
# Installs NVRTC and ptxas from NVIDIA's PyPI wheels (nvidia-cuda-nvrtc, nvidia-cuda-nvcc) into
# a cache outside the checkout (${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/nvrtc/<version>)
# and prints "<libnvrtc path> <ptxas path>", for scripts/kernel_check.py on machines without a
# GPU or a CUDA toolkit. Only the first run downloads (about 130 MB).
set -euo pipefail
version=13.0.88
dir=${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/nvrtc/$version
lib=$dir/nvidia/cu13/lib/libnvrtc.so.13
ptxas=$dir/nvidia/cu13/bin/ptxas
if [[ ! -e $lib || ! -x $ptxas ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" "nvidia-cuda-nvrtc==$version" "nvidia-cuda-nvcc==$version" >&2
  mkdir -p "$dir.partial"
  for w in "$tmp"/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dir.partial"
  done
  chmod +x "$dir.partial/nvidia/cu13/bin/ptxas"
  rm -rf "$dir"
  mv "$dir.partial" "$dir"
fi
echo "$lib $ptxas"
