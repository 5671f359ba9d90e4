#!/usr/bin/env python3
"""Write a full-width DeepSeek-V3.2 checkpoint with random weights, laid out as the released one.

The config is the released one (engine/tests/fixtures/deepseek-v3.2/config.json) cut to a few
layers; the tensors are those transformers' DeepseekV32ForCausalLM holds, under the checkpoint's
names (routed experts one tensor each), in safetensors shards with model.safetensors.index.json.
With --fp8 the linears the release stores in FP8 are E4M3 with 128x128 `weight_scale_inv`; the
rest is bf16. It exists to measure loading (host memory, read rate) at the real tensor sizes, so
the weights are random and the model computes nothing meaningful.

  python3 scripts/make_checkpoint.py --out /path/ckpt --dense-layers 1 --moe-layers 1 --fp8
"""

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import FP8_MAX, FP8_SUFFIXES  # noqa: E402

RELEASED_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "engine", "tests", "fixtures",
    "deepseek-v3.2", "config.json")


def names_and_shapes(cfg):
    """(name, shape) of every checkpoint tensor, experts split one tensor each."""
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg)
    out = []
    for name, t in model.state_dict().items():
        shape = list(t.shape)
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = shape[1] // 2
            for e in range(shape[0]):
                out.append((f"{prefix}{e}.gate_proj.weight", [inter, shape[2]]))
                out.append((f"{prefix}{e}.up_proj.weight", [inter, shape[2]]))
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(shape[0]):
                out.append((f"{prefix}{e}.down_proj.weight", shape[1:]))
        elif not name.endswith("rotary_emb.inv_freq"):
            out.append((name, shape))
    return out


def quantize(w):
    """128x128 block E4M3 with power-of-two scales, on w's device."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / 128), math.ceil(cols / 128)
    padded = torch.zeros(br * 128, bc * 128, device=w.device)
    padded[:rows, :cols] = w
    blocks = padded.view(br, 128, bc, 128)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(br * 128, bc * 128)[:rows, :cols].contiguous()
    return q, scale.float().contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--moe-layers", type=int, default=1)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    with open(RELEASED_CONFIG) as f:
        raw = json.load(f)
    raw["num_hidden_layers"] = a.dense_layers + a.moe_layers
    raw["first_k_dense_replace"] = a.dense_layers
    if not a.fp8:
        raw.pop("quantization_config", None)
    cfg = DeepseekV32Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    limit = int(a.shard_gib * (1 << 30))
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(a.out, name), metadata={"format": "pt"})
        for t in shard:
            weight_map[t] = name
        files.append(name)
        print(f"wrote {name}: {shard_bytes / 1e9:.2f} GB", flush=True)
        shard, shard_bytes = {}, 0

    for name, shape in names_and_shapes(cfg):
        if len(shape) == 1:
            if name.endswith("e_score_correction_bias"):
                t = 0.2 * (torch.rand(shape, generator=gen, device=dev) - 0.5)
                tensors = {name: t.float()}
            else:
                tensors = {name: (1.0 + 0.1 * torch.randn(shape, generator=gen, device=dev)).to(torch.bfloat16)}
        else:
            w = torch.randn(shape, generator=gen, device=dev) / math.sqrt(shape[-1])
            if a.fp8 and name.endswith(FP8_SUFFIXES):
                q, s = quantize(w)
                tensors = {name: q, name + "_scale_inv": s}
            else:
                tensors = {name: w.to(torch.bfloat16)}
        for n, t in tensors.items():
            b = t.numel() * t.element_size()
            if shard_bytes + b > limit:
                flush()
            shard[n] = t.cpu()
            shard_bytes += b
            total += b
    flush()
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"{len(files)} shards, {total / 2**30:.2f} GiB in {a.out}")


if __name__ == "__main__":
    main()
