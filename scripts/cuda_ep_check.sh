#!/usr/bin/env bash
# On a GPU machine, from prebuilt binaries (no Rust toolchain needed there): the CUDA and NCCL
# tests, expert parallelism across two processes that share GPU 0 over the TCP transport
# checked against one process, and the streaming load of a full-width FP8 checkpoint (peak
# host memory and read rate, against the storage's own read rate).
#
#   scripts/cuda_ep_check.sh <bin dir: deepseek-engine, cuda-*, nccl-*> <out dir>
#
# STAGES (default "tests ep load fullwidth") picks the parts to run; "fullwidth" splits a
# full-width FP8 checkpoint with 2 MoE layers over two processes and compares logits, greedy
# tokens and decode speed with one process, and times the MoE exchange.
set -u
stages=" ${STAGES:-tests ep load fullwidth} "

bins=${1:?usage: cuda_ep_check.sh <bin dir> <out dir>}
out=${2:?usage: cuda_ep_check.sh <bin dir> <out dir>}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
libdir=$(mktemp -d)
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$nccl" ] && [ -e "$nccl/libnccl.so.2" ] && ln -sf "$nccl/libnccl.so.2" "$libdir/libnccl.so"
export LD_LIBRARY_PATH="$libdir:${nccl:-}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
export DEEPSEEK_ENGINE_KERNEL_CACHE="$libdir/ptx"
engine="$bins/deepseek-engine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0

ep_pair() {
    local port=$1; shift
    RANK=1 WORLD_SIZE=2 LEADER_ADDR=127.0.0.1:$port RUST_LOG=info "$engine" "$@" \
        > "$out/ep_rank1.log" 2>&1 &
    local worker=$!
    RANK=0 WORLD_SIZE=2 LEADER_ADDR=127.0.0.1:$port RUST_LOG=info "$engine" "$@" \
        2> "$out/ep_rank0.log"
    wait $worker || echo "rank 1 exited with $?"
}

if [[ $stages == *" tests "* ]]; then
echo "== CUDA and NCCL tests"
"$bins"/cuda-* --test-threads=1 > "$out/tests.log" 2>&1 || status=1
"$bins"/nccl-* --test-threads=1 >> "$out/tests.log" 2>&1 || status=1
grep -E "^test .*(FAILED|ok)$|test result|panicked" "$out/tests.log" | grep -vE " ok$" | head -20
grep -E "EP [24] sequence" "$out/tests.log" | sort | uniq | head -8
fi

if [[ $stages == *" ep "* ]]; then
echo "== expert parallelism: two processes on GPU 0 over TCP against one process"
port=29611
for spec in "tiny-deep f32" "tiny-sharded f32" "tiny-fp8 fp8" "tiny-deep bf16"; do
    set -- $spec
    flags=(--backend cuda --model "$root/engine/tests/fixtures/$1" --weight-dtype "$2"
           --kv-cache-dtype "$2" --prompt-ids 5,6,7,8,9,10,11,12 --max-tokens 12 --ignore-eos)
    one=$("$engine" generate "${flags[@]}" 2> "$out/ep_single.log")
    two=$(ep_pair $port generate "${flags[@]}")
    port=$((port + 1))
    verdict=same; [ "$one" = "$two" ] || verdict=DIFFERENT
    echo "$1 $2: one process $one | two ranks $two | $verdict"
    [ "$2" = f32 ] && [ "$verdict" != same ] && status=1
done
grep -hE "expert|rank|ERROR|error|MoE rows" "$out/ep_rank0.log" "$out/ep_rank1.log" | head -8
# Asked for NCCL, two ranks sharing one GPU must refuse to start, naming the shared GPU.
MOE_EXCHANGE=nccl ep_pair $((port + 1)) generate "${flags[@]}" > /dev/null
if grep -q "share GPU" "$out/ep_rank0.log"; then
    grep -h "share GPU" "$out/ep_rank0.log" | head -1
else
    echo "--moe-exchange nccl with two ranks on one GPU did not refuse"; status=1
fi
fi

if [[ $stages == *" load "* ]]; then
echo "== streaming load of a full-width checkpoint (1 dense + 1 MoE layer, FP8)"
ckpt=/tmp/dsv32-fullwidth
[ -e "$ckpt/model.safetensors.index.json" ] || python3 "$root/scripts/make_checkpoint.py" \
    --out "$ckpt" --dense-layers 1 --moe-layers 1 --fp8 > "$out/make_checkpoint.log" 2>&1 \
    || { status=1; tail -5 "$out/make_checkpoint.log"; }
tail -1 "$out/make_checkpoint.log"
first=$(ls "$ckpt"/model-*.safetensors | head -1)
echo "storage read rate (O_DIRECT, one shard):"
dd if="$first" of=/dev/null bs=64M iflag=direct 2>&1 | tail -1
timed=(); [ -x /usr/bin/time ] && timed=(/usr/bin/time -v)
for w in fp8 bf16; do
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    "${timed[@]}" "$engine" generate --backend cuda --model "$ckpt" --weight-dtype $w \
        --kv-cache-dtype bf16 --prompt-ids 1,2,3,4 --max-tokens 2 --ignore-eos \
        > "$out/load_$w.out" 2> "$out/load_$w.log" || { status=1; tail -5 "$out/load_$w.log"; }
    echo "weights $w:"
    grep -hE "weights streamed|CUDA memory plan" "$out/load_$w.log" | head -2
    grep -E "Maximum resident|Elapsed" "$out/load_$w.log"
    cat "$out/load_$w.out"
done
fi
if [[ $stages == *" fullwidth "* ]]; then
echo "== full width, 1 dense + 2 MoE layers, FP8: two processes on GPU 0 against one"
ckpt2=/tmp/dsv32-fullwidth-2moe
[ -e "$ckpt2/model.safetensors.index.json" ] || python3 "$root/scripts/make_checkpoint.py" \
    --out "$ckpt2" --dense-layers 1 --moe-layers 2 --fp8 > "$out/make_checkpoint2.log" 2>&1 \
    || { status=1; tail -5 "$out/make_checkpoint2.log"; }
tail -1 "$out/make_checkpoint2.log"
prompt=$(python3 -c 'print(",".join(str(7 * i % 120000 + 3) for i in range(16)))')
long=$(python3 -c 'print(",".join(str(13 * i % 120000 + 3) for i in range(512)))')
common=(--backend cuda --model "$ckpt2" --weight-dtype fp8 --kv-cache-dtype fp8)
"$engine" score "${common[@]}" --prompt-ids "$prompt" > "$out/score_one.json" 2> "$out/score_one.log"
ep_pair 29650 score "${common[@]}" --prompt-ids "$prompt" > "$out/score_two.json"
python3 - "$out/score_one.json" "$out/score_two.json" <<'PY' && rm -f "$out/score_one.json" "$out/score_two.json"
import json, sys, math
a = json.load(open(sys.argv[1]))["logits"]; b = json.load(open(sys.argv[2]))["logits"]
worst = 0.0
for ra, rb in zip(a, b):
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(ra, rb))); den = math.sqrt(sum(x * x for x in ra))
    worst = max(worst, num / max(den, 1e-30))
am = [max(range(len(r)), key=r.__getitem__) for r in a]; bm = [max(range(len(r)), key=r.__getitem__) for r in b]
print(f"score, 16 positions: worst relative L2 error two ranks vs one {worst:.2e}; argmax equal at {sum(x == y for x, y in zip(am, bm))}/16")
PY
gen=(generate "${common[@]}" --prompt-ids "$prompt" --max-tokens 64 --ignore-eos)
one=$("$engine" "${gen[@]}" 2> "$out/gen_one.log")
two=$(ep_pair 29651 "${gen[@]}")
cp "$out/ep_rank0.log" "$out/gen_two_rank0.log"; cp "$out/ep_rank1.log" "$out/gen_two_rank1.log"
verdict=same; [ "$one" = "$two" ] || { verdict=DIFFERENT; status=1; }
echo "generate 64 tokens: $verdict"
for f in gen_one gen_two_rank0; do
    echo "$f: $(grep -o 'generated=[0-9]* .*secs="[0-9.]*"' "$out/$f.log" | head -1)"
done
grep -h "expert-parallel MoE exchanges" "$out/gen_two_rank0.log" "$out/gen_two_rank1.log" | sed 's/.*exchanges//'
ep_pair 29652 score "${common[@]}" --prompt-ids "$long" --last-only > /dev/null
echo "prefill of 512 tokens (4096 rows per MoE layer):"
grep -h "expert-parallel MoE exchanges" "$out/ep_rank0.log" "$out/ep_rank1.log" | sed 's/.*exchanges//'
echo "bench of the checkpoint, EP1 (one process) against EP2 (two processes on GPU 0):"
# Small shapes: the host-staged exchange of two ranks sharing the GPU moves prefill slowly.
shapes=(--checkpoint --prefill 1x512 --decode-batches 1,8,32 --contexts 512 --decode-steps 16)
"$engine" bench "${common[@]}" "${shapes[@]}" --out "$out/bench_ep1.json" > /dev/null \
    2> "$out/bench_ep1.log" || { status=1; tail -3 "$out/bench_ep1.log"; }
ep_pair 29653 bench "${common[@]}" "${shapes[@]}" --out "$out/bench_ep2.json" > /dev/null
python3 - "$out/bench_ep1.json" "$out/bench_ep2.json" <<'PY' || status=1
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:3])
for a, b in zip(one["prefill"], two["prefill"]):
    print(f"prefill {a['sequences']}x{a['tokens']}: EP1 {a['tokens_per_s']:.0f} tok/s, EP2 {b['tokens_per_s']:.0f} tok/s ({b['tokens_per_s'] / a['tokens_per_s']:.2f}x)")
for a, b in zip(one["decode"], two["decode"]):
    print(f"decode batch {a['batch']} at {a['context']}: EP1 {a['ms_per_step']:.2f} ms/step {a['tokens_per_s']:.0f} tok/s, EP2 {b['ms_per_step']:.2f} ms/step {b['tokens_per_s']:.0f} tok/s ({b['tokens_per_s'] / a['tokens_per_s']:.2f}x)")
PY
grep -h "expert-parallel MoE exchanges" "$out/ep_rank0.log" | sed 's/.*exchanges//' | tail -1
fi
exit $status
