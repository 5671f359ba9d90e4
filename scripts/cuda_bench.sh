#!/usr/bin/env bash
# On a GPU machine, from prebuilt test binaries (no Rust toolchain needed there): runs the CUDA
# and NCCL tests, the full-width CUDA benchmark and the PyTorch peer, writing logs and JSON to
# an output folder.
#
#   scripts/cuda_bench.sh <bin dir with cuda-* and nccl-* test binaries> <out dir> [build root]
#
# cudarc loads `libnccl.so`; pip's NCCL ships only `libnccl.so.2`, so a link is made first.
set -u
bins=${1:?usage: cuda_bench.sh <bin dir> <out dir> [build workspace root]}
out=${2:?usage: cuda_bench.sh <bin dir> <out dir> [build workspace root]}
build_root=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
libdir=$(mktemp -d)
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$nccl" ] && [ -e "$nccl/libnccl.so.2" ] && ln -sf "$nccl/libnccl.so.2" "$libdir/libnccl.so"
export LD_LIBRARY_PATH="$libdir:${nccl:-}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
if [ -n "$build_root" ] && [ "$build_root" != "$root" ]; then
    mkdir -p "$(dirname "$build_root")"
    ln -sfn "$root" "$build_root"
fi
export DEEPSEEK_ENGINE_KERNEL_CACHE="$libdir/ptx"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
status=0
"$bins"/cuda-* --test-threads=1 2>&1 | tee "$out/tests.log" | grep -E "^test |test result|panicked" || true
[ "${PIPESTATUS[0]}" = 0 ] || status=1
"$bins"/nccl-* --test-threads=1 --nocapture 2>&1 | tee -a "$out/tests.log" | grep -E "^test |test result|skipping|NCCL|panicked" || true
DEEPSEEK_BENCH_OUT="$out/bench.json" RUST_LOG=info "$bins"/cuda-* --ignored full_width_benchmark --nocapture > "$out/bench.log" 2>&1 || { status=1; tail -20 "$out/bench.log"; }
PYTHONUNBUFFERED=1 python3 "$root/scripts/cuda_peer.py" > "$out/peer.json" 2> "$out/peer.log" || { status=1; tail -20 "$out/peer.log"; }
exit $status
