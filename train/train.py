#!/usr/bin/env python3
"""Train the built-in model from scratch: transformers' DeepseekV32ForCausalLM on the data of
data.py, tokenized by the tokenizer of tokenizer.py.

What it does besides next-token cross-entropy:
- Lightning indexer. HF computes the indexer's top-k under no_grad, so the LM loss never
  reaches it. As in DeepSeek-V3.2's continued pre-training, the indexer is trained with its own
  loss: the KL divergence from the main attention (summed over heads, renormalized, detached)
  to the softmax of the index scores, on inputs detached from the main graph. For the first
  --dense-warmup fraction of steps attention is dense (top-k = context) and the KL is over every
  causal key; after that the model trains sparse (top-k = index_topk) and the KL is over the
  selected keys, as in DeepSeek's sparse stage.
- Expert load balancing without an auxiliary loss (DeepSeek-V3): after each step the router's
  e_score_correction_bias moves by --bias-rate towards equal expert load.
- Mixed data: each training sequence is --context tokens from one source, chosen with the
  weights of --mix; chat sequences start at a conversation's first token.

bf16 autocast on CUDA (fp32 on the CPU), AdamW, linear warmup then cosine decay to 10%. With
--minutes the number of steps is fixed after timing the first steps, so the whole schedule
fits the budget (the log prints it; pass --steps N to repeat a run's schedule). Seeded:
on the CPU runs repeat exactly; on a GPU the MoE scatter and grouped GEMMs are not bitwise
deterministic.

  python3 train/train.py --data data/ --out run/ --minutes 3            # on one H200
  python3 train/train.py --data data/ --out /tmp/dry --shape tiny --steps 5 --batch 2   # CPU
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_config  # noqa: E402

# Measured on one H200: with austen=0.4 the Austen held-out perplexity is best after ~10M
# tokens and then climbs (the novels are 0.95M tokens); 0.15 over a 3-minute run kept improving.
DEFAULT_MIX = "austen=0.15,wordnet=0.75,chatterbot=0.1"


def log(out_dir, record):
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(out_dir, "train_log.jsonl"), "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- data

def load_split(data_dir, split, tokenizer):
    """Per source: one token array (documents concatenated) and the offsets where documents start."""
    docs = {}
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.setdefault(d["source"], []).append(d)
    out = {}
    for source, items in sorted(docs.items()):
        encs = tokenizer.encode_batch([d["text"] for d in items], add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in encs], dtype=np.int64)
        tokens = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(lengths.sum()))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[source] = {"tokens": tokens, "starts": starts, "chat": items[0]["kind"] == "chat", "docs": len(items)}
    return out


class Sampler:
    """Training sequences of context+1 tokens: a source by weight, then a start (a random
    document start for chats, any position for prose); the stream wraps around."""

    def __init__(self, data, mix, context, seed):
        self.data, self.context = data, context
        self.sources = [s for s in mix if s in data and mix[s] > 0]
        w = np.array([mix[s] for s in self.sources], dtype=np.float64)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size):
        n = self.context + 1
        rows = np.empty((size, n), dtype=np.int64)
        which = self.rng.choice(len(self.sources), size=size, p=self.weights)
        for r, si in enumerate(which):
            d = self.data[self.sources[si]]
            toks = d["tokens"]
            if d["chat"]:
                start = int(d["starts"][self.rng.integers(len(d["starts"]))])
            else:
                start = int(self.rng.integers(len(toks)))
            idx = (start + np.arange(n)) % len(toks)
            rows[r] = toks[idx]
        return torch.from_numpy(rows)


def eval_windows(data, context, max_windows):
    """Held-out windows per source: consecutive, non-overlapping, from the start of the split."""
    out = {}
    for source, d in data.items():
        toks = d["tokens"]
        n = min(max_windows, max(1, len(toks) // (context + 1)))
        wins = []
        for i in range(n):
            w = toks[i * (context + 1):(i + 1) * (context + 1)]
            if len(w) < 2:
                break
            wins.append(torch.from_numpy(w.astype(np.int64)))
        out[source] = wins
    return out


# ---------------------------------------------------------------- indexer and router hooks

class IndexerTrainer:
    """Recomputes each layer's index scores with gradients (inputs detached) and its KL loss
    against the main attention's distribution."""

    def __init__(self, model):
        from transformers.models.deepseek_v32 import modeling_deepseek_v32 as m

        self.m = m
        self.enabled = True
        self.pending = {}
        self.losses = []
        self.handles = []
        for layer in model.model.layers:
            attn = layer.self_attn
            self.handles.append(attn.indexer.register_forward_hook(self._indexer_hook, with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._attn_hook))

    def _scores(self, mod, hidden, q_resid, cos, sin):
        b, s, _ = hidden.shape
        q = mod.wq_b(q_resid).view(b, s, mod.n_heads, mod.head_dim)
        q_rot, q_pass = torch.split(q, [mod.qk_rope_head_dim, mod.head_dim - mod.qk_rope_head_dim], dim=-1)
        k = mod.k_norm(mod.wk(hidden)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, [mod.qk_rope_head_dim, mod.head_dim - mod.qk_rope_head_dim], dim=-1)
        q_rot, k_rot = self.m.apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        # [B, S, H, D] x [B, 1, D, T] -> [B, S, H, T]; ReLU before the head weights.
        scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * mod.softmax_scale)
        w = mod.weights_proj(hidden.to(mod.weights_proj.weight.dtype)).float() * (mod.n_heads ** -0.5)
        return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)  # [B, S, T]

    def _indexer_hook(self, mod, args, kwargs, output):
        if not (self.enabled and torch.is_grad_enabled()):
            return
        names = ["hidden_states", "q_resid", "position_embeddings", "attention_mask"]
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        hidden, q_resid, (cos, sin), mask = vals[:4]
        with torch.enable_grad():
            scores = self._scores(mod, hidden.detach(), q_resid.detach(), cos, sin)
        b, s, t = scores.shape
        allowed = mask if mask.dtype == torch.bool else (mask == 0)  # causal (+ padding)
        selected = torch.zeros((b, s, t), dtype=torch.bool, device=scores.device)
        selected.scatter_(-1, output.long(), True)
        self.pending[mod.layer_idx] = (scores, selected & allowed.expand(b, s, t))

    def _attn_hook(self, mod, args, output):
        if not (self.enabled and torch.is_grad_enabled()):
            return
        scores, selected = self.pending.pop(mod.layer_idx)
        probs = output[1]
        if probs is None:
            raise SystemExit("the indexer loss needs attention weights: use attn_implementation eager")
        target = probs.detach().float().sum(1)  # [B, S, T] summed over heads
        target = target.masked_fill(~selected, 0.0)
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
        logp = torch.log_softmax(scores.masked_fill(~selected, float("-inf")), dim=-1)
        logp = logp.masked_fill(~selected, 0.0)
        ent = (target * torch.log(target.clamp(min=1e-30))).sum(-1)
        kl = (ent - (target * logp).sum(-1)).mean()
        self.losses.append(kl)

    def take(self):
        losses, self.losses = self.losses, []
        return torch.stack(losses).mean() if losses else None


class RouterBalancer:
    """Counts each router's expert choices; moves e_score_correction_bias towards equal load."""

    def __init__(self, model, rate):
        self.rate = rate
        self.routers = []
        self.counts = {}
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                self.routers.append(gate)
                gate.register_forward_hook(self._hook)

    def _hook(self, mod, args, output):
        if not mod.training:
            return
        idx = output[2]
        c = torch.bincount(idx.reshape(-1), minlength=mod.num_experts).float()
        self.counts[id(mod)] = self.counts.get(id(mod), 0) + c

    @torch.no_grad()
    def step(self):
        imbalance = []
        for r in self.routers:
            c = self.counts.pop(id(r), None)
            if c is None:
                continue
            r.e_score_correction_bias.add_(self.rate * torch.sign(c.mean() - c))
            imbalance.append(float(c.max() / c.mean().clamp(min=1)))
        return max(imbalance) if imbalance else None


# ---------------------------------------------------------------- training

def parse_mix(text):
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = float(v)
    return out


def set_topk(model, k):
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k


@torch.no_grad()
def evaluate(model, windows, batch, device, amp):
    model.eval()
    res, tot_loss, tot_n = {}, 0.0, 0
    for source, wins in windows.items():
        loss_sum, n = 0.0, 0
        for i in range(0, len(wins), batch):
            x = torch.stack(wins[i:i + batch]).to(device)
            with amp():
                logits = model(x[:, :-1], use_cache=False).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            loss_sum += float(loss)
            n += x[:, 1:].numel()
        res[source] = {"loss": loss_sum / n, "ppl": math.exp(loss_sum / n), "tokens": n}
        tot_loss += loss_sum
        tot_n += n
    res["all"] = {"loss": tot_loss / tot_n, "ppl": math.exp(tot_loss / tot_n), "tokens": tot_n}
    model.train()
    return res


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data directory (data.py) with tokenizer.json (tokenizer.py)")
    ap.add_argument("--out", required=True, help="run directory: log, final model (hf/)")
    ap.add_argument("--shape", default="builtin", choices=sorted(model_config.SHAPES))
    ap.add_argument("--tokenizer", default=None, help="default DATA/tokenizer.json")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the training steps")
    ap.add_argument("--steps", type=int, default=None, help="number of steps (overrides --minutes)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the shape's)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dense-warmup", type=float, default=0.1,
                    help="fraction of steps with dense attention (indexer trained on every key)")
    ap.add_argument("--indexer-loss-weight", type=float, default=1.0)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="router bias update speed")
    ap.add_argument("--mix", default=DEFAULT_MIX, help="source weights of the training sequences")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--experts", default=None, help="transformers experts_implementation (default grouped_mm on CUDA)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.steps is None and args.minutes is None:
        ap.error("give --steps or --minutes")

    from tokenizers import Tokenizer
    import transformers
    from transformers import DeepseekV32ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "train_log.jsonl"), "w").close()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tok_path = args.tokenizer or os.path.join(args.data, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    context = args.context or model_config.context_of(args.shape)

    t0 = time.time()
    train_data = load_split(args.data, "train", tokenizer)
    eval_data = load_split(args.data, "eval", tokenizer)
    sizes = {s: {"train_tokens": int(len(train_data[s]["tokens"])), "train_docs": train_data[s]["docs"],
                 "eval_tokens": int(len(eval_data.get(s, {"tokens": []})["tokens"]))} for s in train_data}
    log(args.out, {"event": "data", "sources": sizes, "seconds": round(time.time() - t0, 1)})

    cfg = model_config.make_config(args.shape, vocab)
    cfg._attn_implementation = "eager"  # the indexer loss reads the attention weights
    cfg._experts_implementation = args.experts or ("grouped_mm" if cuda else "eager")
    model = DeepseekV32ForCausalLM(cfg).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    log(args.out, {"event": "model", "shape": args.shape, "parameters": n_params, "active_parameters": active,
                   "context": context, "index_topk": cfg.index_topk, "vocab": vocab,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "experts_implementation": cfg._experts_implementation, "device": str(device)})

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    indexer = IndexerTrainer(model)
    balancer = RouterBalancer(model, args.bias_rate)
    sampler = Sampler(train_data, parse_mix(args.mix), context, args.seed)
    windows = eval_windows(eval_data, context, args.eval_windows)

    def amp():
        if cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    total = args.steps
    budget = args.minutes * 60 if args.minutes and not args.steps else None
    probe = (5, 25)  # steps timed to fix the schedule (the first ones include warm-up costs)
    step, tokens_seen, t_start = 0, 0, time.time()
    t_mark = None
    while True:
        if total is not None and step >= total:
            break
        if total is None and step == probe[0]:
            t_mark = time.time()
        if total is None and step == probe[1]:
            per_step = (time.time() - t_mark) / (probe[1] - probe[0])
            elapsed = time.time() - t_start
            # Leave room for the evaluations still to come (about 5% of the time).
            total = max(step + 1, step + int((budget - elapsed) / per_step * 0.95))
            log(args.out, {"event": "schedule", "steps": total, "seconds_per_step": round(per_step, 4)})
        planned = total if total is not None else 1000
        dense = step < int(args.dense_warmup * planned)
        set_topk(model, context if dense else cfg.index_topk)
        lr = lr_at(step, planned, args.lr, max(1, int(args.warmup * planned)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.batch(args.batch).to(device, non_blocking=True)
        with amp():
            logits = model(x[:, :-1], use_cache=False).logits
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        idx_loss = indexer.take()
        loss = lm + args.indexer_loss_weight * idx_loss if idx_loss is not None else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = balancer.step()
        step += 1
        tokens_seen += x[:, 1:].numel()
        if step % 10 == 0 or step == 1:
            log(args.out, {"event": "step", "step": step, "lm_loss": round(lm.item(), 4),
                           "indexer_kl": round(idx_loss.item(), 4) if idx_loss is not None else None,
                           "lr": round(lr, 6), "grad_norm": round(float(gnorm), 3), "dense": dense,
                           "max_expert_load": round(imbalance, 2) if imbalance else None,
                           "tokens": tokens_seen, "elapsed": round(time.time() - t_start, 1),
                           **({"gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)} if cuda else {})})
        if step % args.eval_every == 0:
            set_topk(model, cfg.index_topk)
            log(args.out, {"event": "eval", "step": step, **evaluate(model, windows, args.batch, device, amp)})

    set_topk(model, cfg.index_topk)
    final = evaluate(model, windows, args.batch, device, amp)
    log(args.out, {"event": "final", "step": step, "tokens": tokens_seen,
                   "train_seconds": round(time.time() - t_start, 1), **final})
    for h in indexer.handles:
        h.remove()
    hf_dir = os.path.join(args.out, "hf")
    model.save_pretrained(hf_dir)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"shape": args.shape, "steps": step, "tokens": tokens_seen, "args": vars(args),
                   "data": sizes, "parameters": n_params, "active_parameters": active,
                   "final_eval": final}, f, indent=2)
    import shutil

    shutil.copy(tok_path, os.path.join(args.out, "tokenizer.json"))
    print(f"saved {hf_dir}")


if __name__ == "__main__":
    main()
