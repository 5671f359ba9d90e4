#!/usr/bin/env bash
# On a GPU machine: `serve --backend cuda` end to end (health, readiness, chat, streaming,
# metrics) with the built-in model (SERVE_FLAGS adds flags, e.g. "--weight-dtype fp8
# --kv-cache-dtype fp8"), plus a short full-width benchmark through `bench`.
#   scripts/cuda_serve_check.sh <deepseek-engine binary> <out dir>
set -u
bin=${1:?usage: cuda_serve_check.sh <binary> <out dir>}
out=${2:?usage: cuda_serve_check.sh <binary> <out dir>}
mkdir -p "$out"
export DEEPSEEK_ENGINE_KERNEL_CACHE=$(mktemp -d)
"$bin" serve --backend cuda --port 18080 ${SERVE_FLAGS:-} > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do curl -sf localhost:18080/ready > /dev/null && break; sleep 1; done
curl -s localhost:18080/ready; echo
curl -s localhost:18080/v1/chat/completions -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello from an H200"}],"max_tokens":16,"seed":3}' | tee "$out/chat.json"; echo
curl -sN localhost:18080/v1/chat/completions -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Stream"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}' | tail -3
curl -s localhost:18080/metrics | grep -E '^vllm:(generation_tokens_total|kv_cache_usage_perc|cache_config_info)'
kill $pid; wait $pid 2>/dev/null
grep -E 'plan|device|ERROR' "$out/serve.log" | head -5
"$bin" generate --backend cuda --model engine/tests/fixtures/tiny-deep --prompt-ids 5,6,7,8,9 --max-tokens 8 --ignore-eos 2>/dev/null
"$bin" generate --backend cpu --model engine/tests/fixtures/tiny-deep --prompt-ids 5,6,7,8,9 --max-tokens 8 --ignore-eos 2>/dev/null
# The FP8 checkpoint with its own E4M3 weights and the FP8 caches on the GPU, and the CPU's f32.
"$bin" generate --backend cuda --model engine/tests/fixtures/tiny-fp8 --weight-dtype fp8 --kv-cache-dtype fp8 \
  --prompt-ids 5,6,7,8,9 --max-tokens 8 --ignore-eos 2>/dev/null
"$bin" generate --backend cpu --model engine/tests/fixtures/tiny-fp8 --prompt-ids 5,6,7,8,9 --max-tokens 8 --ignore-eos 2>/dev/null
"$bin" bench --backend cuda --dense-layers 1 --moe-layers 1 --prefill 1x2048 --decode-batches 1,16 \
  --contexts 2048 --decode-steps 3 --out "$out/bench_cli.json" > "$out/bench_cli.log" 2>&1 \
  && echo "bench ok" || tail -5 "$out/bench_cli.log"
