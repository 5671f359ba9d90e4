#!/usr/bin/env bash
# On a GPU machine with Nsight Compute: per-kernel GPU time of the full-width model's steps
# (1 dense + 1 MoE layer, FP8 weights, bf16 cache), without the benchmark's kernel timings.
#   1. prefill 1 x 4096 (three runs: a warm-up and two timed; a tiny decode after);
#   2. decode at batch 64 over a 128K context (a warm-up step and one timed; a tiny prefill
#      before);
#   3. decode at batch 1 over a 4K context: 3 one-token prefills and 12 decode steps (bench
#      times each decode shape twice), so the total over 15 is the kernels' time per step, to
#      set against the step's wall time from a plain `bench` of the same shape (printed last).
# PHASES (default "prefill decode decode1") picks them. Each writes Nsight Compute's per-kernel summary as CSV, then the kernels' total time by name,
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
phases=" ${PHASES:-prefill decode decode1} "
[[ $phases == *" prefill "* ]] &&
    profile prefill 3 --prefill 1x4096 --decode-batches 1 --contexts 1024 --decode-steps 1
[[ $phases == *" decode "* ]] &&
    profile decode 4 --prefill 1x64 --decode-batches 64 --contexts 131072 --decode-steps 1
if [[ $phases == *" decode1 "* ]]; then
    shape=(--prefill 1x1 --decode-batches 1 --contexts 4096 --decode-steps 5)
    profile decode1 15 "${shape[@]}"
    "$bins/deepseek-engine" bench --backend cuda --dense-layers 1 --moe-layers 1 --no-gemm-timings \
        --no-dsa-timings "${shape[@]}" --out "$out/decode1_wall.json" > /dev/null 2>&1 || status=1
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["decode"][0]; print("decode1 wall ms/step", d["ms_per_step"], "with the MoE sorted on the host", d["ms_per_step_moe_sorted_on_host"])' "$out/decode1_wall.json"
fi
exit $status
