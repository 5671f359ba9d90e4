#!/usr/bin/env python3
"""PyTorch peer for the CUDA benchmark: times, in bf16 on the GPU, the dominant matrix products
of DeepSeek-V3.2's layers at full width for the benchmark's token counts, and prints JSON.

Per layer: the MLA projections (q_a, q_b, kv_a, kv_b absorbed per head as batched products,
o_proj), the indexer projections (wq_b, wk, weights_proj), the router, and the dense MLP or the
MoE (routed experts as a loop of per-expert products over their tokens, as transformers runs
them, plus the shared expert); lm_head on one row per sequence. Attention and the indexer's scan
are left out, so this is a lower bound on a PyTorch forward of the same shapes.
Routed tokens are spread evenly over min(256, 8 x tokens) experts.

It also times single linear layers at the benchmark's GEMM shapes: bf16 `x @ W.T`, and FP8 with
DeepSeek's scaling (activations per token per 128 channels, weights per 128x128 block) through
`torch._scaled_mm`'s block-wise mode, with and without quantizing the activations in the timed
region.

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


GEMM_SHAPES = [(64, 2048, 7168), (64, 7168, 2048), (4096, 2048, 7168), (4096, 24576, 1536),
               (4096, 7168, 16384)]


def quant_rows(x):
    """Per-row, per-128-column E4M3 codes and power-of-two scales (DeepSeek's act_quant)."""
    n, k = x.shape
    g = x.float().view(n, k // 128, 128)
    s = (g.abs().amax(-1).clamp(min=1e-4) / 448.0)
    s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (g / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, k)
    return q, s


def quant_blocks(w):
    o, k = w.shape
    b = w.float().view(o // 128, 128, k // 128, 128)
    s = b.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (b / s[:, None, :, None]).to(torch.float8_e4m3fn).view(o, k)
    return q, s


# Scale layouts torch versions have accepted for the 1x128 / 128x128 block-wise modes; the first
# that runs and reproduces the product is used (and named in the output).
SCALE_LAYOUTS = {
    "a_mmajor_b_kn": lambda sa, sw: (sa.t().contiguous().t(), sw.t().contiguous()),
    "a_mmajor_b_kn_view": lambda sa, sw: (sa.t().contiguous().t(), sw.t()),
    "a_mmajor_b_nk": lambda sa, sw: (sa.t().contiguous().t(), sw.contiguous()),
    "a_rowmajor_b_kn": lambda sa, sw: (sa.contiguous(), sw.t().contiguous()),
    "a_rowmajor_b_nk": lambda sa, sw: (sa.contiguous(), sw.contiguous()),
}


def scaled_mm_blockwise(q, sa, wq, sw, layout):
    a, b = SCALE_LAYOUTS[layout](sa, sw)
    return torch._scaled_mm(q, wq.t(), scale_a=a, scale_b=b, out_dtype=torch.bfloat16)


def gemms():
    out = []
    for n, o, k in GEMM_SHAPES:
        x, w = rnd(n, k), rnd(o, k)
        flop = 2.0 * n * o * k
        rec = {"tokens": n, "out": o, "in": k}
        ms = time_ms(lambda: x @ w.T, reps=10)
        rec["bf16"] = {"us": ms * 1e3, "tflops": flop / ms / 1e9}
        q, sa = quant_rows(x)
        wq, sw = quant_blocks(w)
        ref = x.float() @ w.float().T
        errors = {}
        for layout in SCALE_LAYOUTS:
            try:
                got = scaled_mm_blockwise(q, sa, wq, sw, layout).float()
                err = float((got - ref).norm() / ref.norm())
                if err > 0.1:
                    errors[layout] = f"l2 error {err:.3f}"
                    continue
                ms = time_ms(lambda: scaled_mm_blockwise(q, sa, wq, sw, layout), reps=10)
                ms_q = time_ms(lambda: scaled_mm_blockwise(*quant_rows(x), wq, sw, layout), reps=10)
                rec["fp8_blockwise"] = {"layout": layout, "us": ms * 1e3, "tflops": flop / ms / 1e9,
                                        "us_with_act_quant": ms_q * 1e3,
                                        "tflops_with_act_quant": flop / ms_q / 1e9,
                                        "l2_rel_vs_f32": err}
                break
            except Exception as e:  # this layout refused, or no block scaling in this build
                errors[layout] = str(e).splitlines()[0][:200]
        if "fp8_blockwise" not in rec:
            rec["fp8_blockwise"] = {"errors": errors}
        out.append(rec)
    return out


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
                      "layers": {"dense": a.dense, "moe": a.moe}, "results": res, "gemms": gemms()},
                     indent=1))


if __name__ == "__main__":
    main()
