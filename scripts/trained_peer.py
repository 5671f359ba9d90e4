#!/usr/bin/env python3
"""PyTorch peer for serving the trained small model (models/deepseek-v3.2-mini) on a GPU:
transformers' DeepseekV32ForCausalLM with the checkpoint's weights (FP8 dequantized, in bf16),
greedy `generate` with its KV cache, timed at the batch sizes the engine's load test uses.
Prints JSON: per batch, output tokens per second over the whole call (prefill included).

    python3 scripts/trained_peer.py --model models/deepseek-v3.2-mini --batches 1,32 \
        --prompt-tokens 64 --new-tokens 64 > peer.json
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
import gen_fixtures as gf  # noqa: E402  (checkpoint naming)
from export import dequantize_files  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    with open(os.path.join(args.model, "config.json")) as f:
        raw = json.load(f)
    raw.pop("quantization_config", None)
    cfg = DeepseekV32Config(**raw)
    torch.set_grad_enabled(False)
    model = DeepseekV32ForCausalLM(cfg).float().eval()
    gf.load_checkpoint_state(model, dequantize_files(args.model))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0), "dtype": "bfloat16", "runs": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(2, cfg.vocab_size, (batch, args.prompt_tokens), generator=gen).cuda()
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=cfg.eos_token_id)
        model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        out["runs"].append({"batch": batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                            "seconds": best, "output_tokens_per_s": batch * args.new_tokens / best})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
