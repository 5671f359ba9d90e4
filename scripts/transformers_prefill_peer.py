#!/usr/bin/env python3
"""PyTorch peer for the benchmark's prefill: transformers' DeepseekV32ForCausalLM at DeepSeek-V3.2's
full width (the released config.json, cut to 1 dense + N MoE layers), random bf16 weights on
the GPU, eager attention, one forward over SEQUENCES x TOKENS without a cache; the median of
three timed runs after a warm-up. Prints JSON with the per-layer time (the whole forward over
the layer count, so embedding and lm_head are charged to the layers).

    python3 scripts/transformers_prefill_peer.py [--moe 1] [--tokens 4096] > prefill_peer.json
"""
import argparse
import json
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "engine/tests/fixtures/deepseek-v3.2/config.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", type=int, default=1)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    import transformers
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    with open(CONFIG) as f:
        raw = json.load(f)
    raw.pop("quantization_config", None)
    layers = 1 + a.moe
    raw["num_hidden_layers"] = layers
    raw["first_k_dense_replace"] = 1
    for key in ("layer_types", "mlp_layer_types"):
        raw.pop(key, None)
    cfg = DeepseekV32Config(**raw)
    cfg._attn_implementation = "eager"
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = DeepseekV32ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.sequences, a.tokens), device="cuda")
    times = []
    for run in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        if run > 0:
            times.append(time.perf_counter() - t)
    times.sort()
    ms = times[len(times) // 2] * 1e3
    print(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0), "layers": {"dense": 1, "moe": a.moe},
        "sequences": a.sequences, "tokens": a.tokens, "ms": ms, "ms_per_layer": ms / layers,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }, indent=1))


if __name__ == "__main__":
    main()
