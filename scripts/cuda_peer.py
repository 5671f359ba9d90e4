#!/usr/bin/env python3
"""PyTorch peer for the CUDA benchmark: times, in bf16 on the GPU, the dominant matrix products
of DeepSeek-V3.2's layers at full width for the benchmark's token counts, and prints JSON.

Per layer: the MLA projections (q_a, q_b, kv_a, kv_b absorbed per head as batched products,
o_proj), the indexer projections (wq_b, wk, weights_proj), the router, and the dense MLP or the
MoE (routed experts as a loop of per-expert products over their tokens, as transformers runs
them, plus the shared expert); lm_head on one row per sequence. Attention and the indexer's scan
are left out, so this is a lower bound on a PyTorch forward of the same shapes.
Routed tokens are spread evenly over min(256, 8 x tokens) experts.

    python3 scripts/cuda_peer.py [--dense 1] [--moe 3] > peer.json
"""
import argparse
import json

import torch

H, QL, KVR, RD, NOPE, VD, HEADS = 7168, 1536, 512, 64, 128, 128, 128
IH, ID, E, TOPK, MI, INTER, VOCAB = 64, 128, 256, 8, 2048, 18432, 129280


def rnd(*shape):
    return (torch.rand(*shape, device="cuda", dtype=torch.float32) * 2 - 1).to(torch.bfloat16)


class Weights:
    def __init__(self):
        self.q_a, self.q_b = rnd(QL, H), rnd(HEADS * (NOPE + RD), QL)
        self.kv_a, self.o = rnd(KVR + RD, H), rnd(H, HEADS * VD)
        self.w_uk, self.w_uv = rnd(HEADS, NOPE, KVR), rnd(HEADS, KVR, VD)
        self.iq, self.ik, self.iw = rnd(IH * ID, QL), rnd(ID, H), rnd(IH, H)
        self.gate = rnd(E, H)
        self.dense = [rnd(INTER, H), rnd(INTER, H), rnd(H, INTER)]
        self.shared = [rnd(MI, H), rnd(MI, H), rnd(H, MI)]
        self.experts = [[rnd(MI, H), rnd(MI, H), rnd(H, MI)] for _ in range(E)]
        self.lm_head = rnd(VOCAB, H)


def mlp(x, w):
    return torch.nn.functional.silu(x @ w[0].T) * (x @ w[1].T) @ w[2].T


def layer(w, x, moe):
    ql = x @ w.q_a.T
    q = (ql @ w.q_b.T).view(-1, HEADS, NOPE + RD)
    _kv = x @ w.kv_a.T
    q_lat = torch.bmm(q[:, :, :NOPE].transpose(0, 1), w.w_uk)  # [heads, n, kvr]
    o = torch.bmm(q_lat, w.w_uv).transpose(0, 1).reshape(-1, HEADS * VD)
    _iq, _ik, _iw = ql @ w.iq.T, x @ w.ik.T, x @ w.iw.T
    y = o @ w.o.T
    if not moe:
        return y + mlp(x, w.dense)
    n = x.shape[0]
    _logits = x @ w.gate.T
    used = min(E, TOPK * n)
    per = (TOPK * n + used - 1) // used
    xs = x.repeat_interleave(TOPK, 0)[: per * used].view(used, per, H) if n * TOPK >= used else x
    for e in range(used):
        rows = xs[e] if n * TOPK >= used else x[:per]
        mlp(rows, w.experts[e])
    return y + mlp(x, w.shared)


def time_ms(fn, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    out.sort()
    return out[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", type=int, default=1)
    ap.add_argument("--moe", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    w = Weights()
    shapes = [("prefill", 1, 4096), ("prefill", 4, 1024)] + [("decode", b, 1) for b in (1, 8, 32, 64)]
    res = []
    for phase, seqs, each in shapes:
        n = seqs * each
        x = rnd(n, H)
        dense_ms = time_ms(lambda: layer(w, x, False))
        moe_ms = time_ms(lambda: layer(w, x, True))
        head_ms = time_ms(lambda: x[:seqs] @ w.lm_head.T)
        step = a.dense * dense_ms + a.moe * moe_ms + head_ms
        res.append({"phase": phase, "sequences": seqs, "tokens_each": each, "dense_layer_ms": dense_ms,
                    "moe_layer_ms": moe_ms, "lm_head_ms": head_ms, "step_ms": step,
                    "tokens_per_s": n / step * 1e3})
    print(json.dumps({"peer": "torch " + torch.__version__, "device": torch.cuda.get_device_name(),
                      "layers": {"dense": a.dense, "moe": a.moe}, "results": res}, indent=1))


if __name__ == "__main__":
    main()
