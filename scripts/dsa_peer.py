#!/usr/bin/env python3
"""PyTorch peer for the benchmark's DeepSeek Sparse Attention kernels (`dsa` in its report):
the same shapes in plain PyTorch, bf16 on the GPU, timed with CUDA events; prints JSON.

- indexer: scores = sum_h w[h] * relu(q[h] . k_j) over each sequence's own keys (one batched
  product, 64 heads x 128), then torch.topk of 2,048; at decode batch 64 over 4K-128K contexts
  and batch 1 at 128K;
- sparse MLA: each token's 2,048 selected latent rows gathered, softmax(q . k / sqrt(192)) over
  them and the weighted sum of their first 512 columns, 128 heads; decode batches 1-128 (own
  rows) and a 4,096-token prefill selecting from one 4,096-row context (in chunks of 256
  tokens, so the gathered rows fit).

    python3 scripts/dsa_peer.py > dsa_peer.json
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_peer import rnd, time_ms  # noqa: E402  (the same timing and data as the GEMM peer)

IH, ID, TOPK = 64, 128, 2048
HEADS, KVR, RD = 128, 512, 64


def indexer(batch, ctx):
    q, k, w = rnd(batch, IH, ID), rnd(batch, ctx, ID), rnd(batch, IH, 1).float()

    def score():
        s = torch.bmm(q, k.transpose(1, 2)).float().relu_()
        return (s * w).sum(1)

    scores = score()
    ms = time_ms(score)
    topk_ms = time_ms(lambda: torch.topk(scores, min(TOPK, ctx), dim=1))
    return {"batch": batch, "context": ctx, "score_us": ms * 1e3, "topk_us": topk_ms * 1e3,
            "key_gb_per_s": batch * ctx * ID * 2 / (ms * 1e-3) / 1e9}


def sparse_mla(n, prefill):
    ctx = 4096 if prefill else n * TOPK
    lat = rnd(ctx, KVR + RD)
    q = rnd(n, HEADS, KVR + RD)
    if prefill:
        sel = torch.stack([torch.arange(TOPK, device="cuda") * 2 + (t & 1) for t in range(n)])
    else:
        sel = torch.arange(n * TOPK, device="cuda").view(n, TOPK)
    scale = 1.0 / math.sqrt(192)
    chunk = 256

    def attend():
        outs = []
        for t0 in range(0, n, chunk):
            kv = lat[sel[t0:t0 + chunk]]  # [c, 2048, 576]
            s = torch.bmm(q[t0:t0 + chunk], kv.transpose(1, 2)).float() * scale
            p = torch.softmax(s, -1).to(torch.bfloat16)
            outs.append(torch.bmm(p, kv[..., :KVR]))
        return outs

    ms = time_ms(attend)
    flops = 2.0 * n * HEADS * TOPK * (KVR + RD + KVR)
    return {"tokens": n, "prefill": prefill, "us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12}


def main():
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "indexer": [],
           "sparse_mla": []}
    for batch, ctx in [(64, 4096), (64, 32768), (64, 65536), (64, 131072), (1, 131072)]:
        out["indexer"].append(indexer(batch, ctx))
        torch.cuda.empty_cache()
    for n, prefill in [(1, False), (8, False), (64, False), (128, False), (4096, True)]:
        out["sparse_mla"].append(sparse_mla(n, prefill))
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
