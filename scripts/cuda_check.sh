#!/usr/bin/env bash
# Checks the CUDA backend on a GPU machine from prebuilt test binaries (no Rust toolchain
# needed there): compiles every kernel family with nvcc for sm_90a to surface all compiler
# errors at once, then runs the CUDA test binary.
#
#   scripts/cuda_check.sh <cuda test binary> [<manifest dir the binary was built with>]
#
# The binary finds its fixtures under the engine directory it was compiled in; pass that
# directory's parent (the workspace root at build time) as the second argument and it is linked
# to this checkout.
set -u
bin=${1:?usage: cuda_check.sh <cuda test binary> [build workspace root]}
build_root=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
kdir="$root/engine/src/backend/cuda/kernels"

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
status=0
tmp=$(mktemp -d)
for f in "$kdir"/*.cu; do
    name=$(basename "$f" .cu)
    cat "$kdir/common.cuh" "$f" > "$tmp/$name.cu"
    if ! nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v -o "$tmp/$name.cubin" "$tmp/$name.cu" 2> "$tmp/$name.log"; then
        echo "nvcc: $name.cu failed"; cat "$tmp/$name.log"; status=1
    else
        grep -E "spill|Used" "$tmp/$name.log" | sed "s/^/$name: /" | head -40
    fi
done

if [ -n "$build_root" ] && [ "$build_root" != "$root" ]; then
    mkdir -p "$(dirname "$build_root")"
    ln -sfn "$root" "$build_root"
fi
export DEEPSEEK_ENGINE_KERNEL_CACHE="$tmp/ptx"
"$bin" --test-threads=1 --nocapture || status=1
exit $status
