#!/usr/bin/env bash
# On a GPU machine with Nsight Compute: per-kernel GPU time of the full-width model's steps
# (1 dense + 1 MoE layer, FP8 weights, bf16 cache), without the benchmark's kernel timings.
#   1. prefill 1 x 4096 (three runs: a warm-up and two timed; a tiny decode after);
#   2. decode at batch 64 over a 128K context (a warm-up step and one timed; a tiny prefill
#      before).
# Each writes Nsight Compute's per-kernel summary as CSV, then the kernels' total time by name,
# largest first, divided by the number of runs of that phase.
#
#   scripts/cuda_profile.sh <bin dir with deepseek-engine> <out dir>
set -u
bins=${1:?usage: cuda_profile.sh <bin dir> <out dir>}
out=${2:?usage: cuda_profile.sh <bin dir> <out dir>}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export DEEPSEEK_ENGINE_KERNEL_CACHE=$(mktemp -d)
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
status=0
profile() {
    local tag=$1 runs=$2
    shift 2
    "$ncu" --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
        "$bins/deepseek-engine" bench --backend cuda --dense-layers 1 --moe-layers 1 \
        --no-gemm-timings --no-dsa-timings "$@" > "$out/ncu_$tag.csv" 2> "$out/ncu_$tag.err" || status=1
    python3 "$root/scripts/ncu_summary.py" "$out/ncu_$tag.csv" --runs "$runs" | tee "$out/$tag.txt"
}
profile prefill 3 --prefill 1x4096 --decode-batches 1 --contexts 1024 --decode-steps 1
profile decode 2 --prefill 1x64 --decode-batches 64 --contexts 131072 --decode-steps 1
exit $status
