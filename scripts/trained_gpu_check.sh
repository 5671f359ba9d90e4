#!/usr/bin/env bash
# On a GPU machine, from prebuilt binaries: the trained small model (models/deepseek-v3.2-mini)
# on the CUDA backend.
#   1. agreement with the CPU per weight and cache type (greedy tokens kept, held-out
#      perplexity): the cuda test binary's trained-model test, JSON to <out>/agreement.json;
#   2. `serve --backend cuda` with no --model (the bundled model, FP8 weights as stored) under
#      the load generator at 1 and 32 concurrent streams, and one chat reply;
#   3. the PyTorch peer (transformers' generate, bf16) at the same batch sizes, in the same run.
#
#   scripts/trained_gpu_check.sh <bin dir: deepseek-engine, loadgen, cuda-*> <out dir>
set -u
bins=${1:?usage: trained_gpu_check.sh <bin dir> <out dir>}
out=${2:?usage: trained_gpu_check.sh <bin dir> <out dir>}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export DEEPSEEK_ENGINE_KERNEL_CACHE=$(mktemp -d)
export DEEPSEEK_ENGINE_MODELS_DIR="$root/models"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0

DEEPSEEK_AGREEMENT_OUT="$out/agreement.json" "$bins"/cuda-* --exact \
    the_trained_model_keeps_its_greedy_tokens_and_perplexity_on_every_gpu_path --nocapture \
    > "$out/agreement.log" 2>&1 || status=1
grep -E "trained model|test result|panicked" "$out/agreement.log"

for flags in "" "--kv-cache-dtype fp8"; do
    tag=${flags:+-fp8cache}
    "$bins/deepseek-engine" serve --backend cuda --port 18090 --max-num-seqs 64 $flags \
        > "$out/serve$tag.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 120); do curl -sf localhost:18090/ready > /dev/null && break; sleep 1; done
    curl -s localhost:18090/v1/chat/completions -H 'content-type: application/json' \
        -d '{"messages":[{"role":"user","content":"What does serendipity mean?"}],"max_tokens":48,"temperature":0}' \
        | tee "$out/chat$tag.json"; echo
    for clients in 1 32; do
        "$bins/loadgen" --url http://127.0.0.1:18090 --clients $clients --requests $((clients * 4)) \
            --max-tokens 64 --prompt-words 32 | tee "$out/load$tag-$clients.json"
    done
    kill $pid; wait $pid 2>/dev/null
done

python3 "$root/scripts/trained_peer.py" --model "$root/models/deepseek-v3.2-mini" --batches 1,32 \
    --prompt-tokens 64 --new-tokens 64 > "$out/peer.json" 2> "$out/peer.log" || status=1
cat "$out/peer.json"; tail -3 "$out/peer.log"
exit $status
