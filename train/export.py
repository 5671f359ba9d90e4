#!/usr/bin/env python3
"""Export a trained run in the released DeepSeek-V3.2 checkpoint's format, with the reference
outputs the engine is tested against.

Writes to --out:
  config.json                      transformers' config (model_type deepseek_v32) with the
                                   released quantization_config (FP8 e4m3, 128x128 blocks, ue8m0)
  model-0000i-of-0000N.safetensors shards of at most --max-shard-mb, with
  model.safetensors.index.json     the weight map; one tensor per routed expert under the
                                   released names; the linears of FP8_SUFFIXES as float8_e4m3fn
                                   with a float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)];
                                   e_score_correction_bias float32; everything else bfloat16
  tokenizer.json, tokenizer_config.json, generation_config.json
  expected.safetensors, expected.json
                                   transformers' outputs computed from the weights as stored
                                   (FP8 dequantized, bf16 widened) in float32 on the CPU:
                                   logits.{i} for held-out prompts (rows at `logit_positions`),
                                   indexer_topk.{layer} for the long prompt, 64-token greedy
                                   continuations of 8 prompts (full recompute per step, not
                                   stopped at EOS), and held-out windows with their perplexity.

The total is checked against --max-total-mb. The export is read back and its logits recomputed
from the files to prove they hold what the reference was computed from.

  python3 train/export.py --run run/ --data data/ --out model/
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
import gen_fixtures as gf  # noqa: E402  (checkpoint naming and the FP8 block quantizer)

GREEDY_TOKENS = 64
LONG_PROMPT_TOKENS = 320  # longer than index_topk, so the reference exercises sparse selection
SHORT_ROW_LIMIT = 48
HELDOUT_WINDOWS = 8       # per source, for the perplexity reference
DEMO_CHATS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "user", "content": "What does serendipity mean?"}],
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prompt_of(doc):
    """The prompt the engine builds for a chat without its final reply; for prose, the text."""
    if doc["kind"] != "chat":
        return doc["text"]
    import data as data_mod

    return data_mod.render_chat(doc["messages"][:-1])


def choose_prompts(eval_docs, tokenizer, index_topk, max_positions):
    by_source = {}
    for d in sorted(eval_docs, key=lambda d: d["id"]):
        by_source.setdefault(d["source"], []).append(d)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731

    # Logit references: two chat prompts, one prose prompt longer than the indexer's top-k.
    logit_prompts = []
    for source in ("wordnet", "chatterbot"):
        d = by_source[source][0]
        logit_prompts.append({"id": d["id"], "ids": enc(prompt_of(d))})
    prose = by_source["austen"][0]
    ids = enc(prose["text"])[:min(LONG_PROMPT_TOKENS, max_positions - 1)]
    assert len(ids) > index_topk
    logit_prompts.append({"id": prose["id"] + ":head", "ids": ids})

    # Greedy prompts: two demo chats, four held-out chats, two held-out prose openings.
    import data as data_mod

    greedy = [{"id": f"demo:{i}", "ids": enc(data_mod.render_chat(m))} for i, m in enumerate(DEMO_CHATS)]
    for source, n in (("wordnet", 2), ("chatterbot", 2)):
        for d in by_source[source][1:1 + n]:
            greedy.append({"id": d["id"], "ids": enc(prompt_of(d))})
    for d in by_source["austen"][:2]:
        greedy.append({"id": d["id"] + ":head", "ids": enc(d["text"])[:48]})
    return logit_prompts, greedy


def heldout_windows(eval_docs, tokenizer, context):
    out = []
    for source in ("austen", "wordnet", "chatterbot"):
        stream = []
        for d in eval_docs:
            if d["source"] == source:
                stream.extend(tokenizer.encode(d["text"], add_special_tokens=False).ids)
        n = min(HELDOUT_WINDOWS, max(1, len(stream) // (context + 1)))
        for i in range(n):
            w = stream[i * (context + 1):(i + 1) * (context + 1)]
            if len(w) > 1:
                out.append({"source": source, "ids": w})
    return out


def quantize_state(state):
    """Stored tensors (FP8 + scales, bf16, f32) and the float32 values they stand for."""
    saved, values = {}, {}
    for key, w in state.items():
        if key.endswith(gf.FP8_SUFFIXES) and w.dim() == 2:
            q, s, deq = gf.quantize_fp8_block(w)
            saved[key] = q
            saved[key + "_scale_inv"] = s
            values[key] = deq
        elif key.endswith("e_score_correction_bias"):
            saved[key] = w.float().contiguous()
            values[key] = saved[key]
        else:
            saved[key] = w.to(torch.bfloat16).contiguous()
            values[key] = saved[key].float()
    return saved, values


def dequantize_files(out_dir):
    """Reads the shards back: the float32 value of every checkpoint tensor."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    raw = {}
    for fname in sorted(set(index["weight_map"].values())):
        raw.update(load_file(os.path.join(out_dir, fname)))
    values = {}
    for key, t in raw.items():
        if key.endswith("_scale_inv"):
            continue
        if key + "_scale_inv" in raw:
            s = raw[key + "_scale_inv"]
            rows, cols = t.shape
            full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
            values[key] = t.float() * full
        else:
            values[key] = t.float()
    return values


def write_shards(saved, out_dir, max_bytes):
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key in sorted(saved):
        n = saved[key].numel() * saved[key].element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = saved[key]
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return len(shards)


def released_config(cfg):
    config = cfg.to_dict()
    for k in ("_attn_implementation_autoset", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
              "_experts_implementation", "experts_implementation"):
        config.pop(k, None)
    config["architectures"] = ["DeepseekV32ForCausalLM"]
    config["model_type"] = "deepseek_v32"
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
    }
    return config


@torch.no_grad()
def reference(model, logit_prompts, greedy_prompts, windows, tokenizer):
    tensors, meta = {}, {"logit_prompts": [], "greedy": [], "heldout": {}}
    captured = {}

    def topk_hook(layer_idx):
        def fn(mod, args, output):
            captured[layer_idx] = output[0].to(torch.int32).contiguous()
        return fn

    for i, p in enumerate(logit_prompts):
        ids = torch.tensor([p["ids"]])
        handles = []
        long = len(p["ids"]) > model.config.index_topk
        if long:
            handles = [layer.self_attn.indexer.register_forward_hook(topk_hook(j))
                       for j, layer in enumerate(model.model.layers)]
        logits = model(ids, use_cache=False).logits[0].float()
        for h in handles:
            h.remove()
        t = logits.shape[0]
        if t <= SHORT_ROW_LIMIT:
            rows = list(range(t))
        else:
            rows = sorted(set(range(0, t, 16)) | set(range(t - 16, t)))
        tensors[f"logits.{i}"] = logits[rows].contiguous()
        entry = {"id": p["id"], "prompt_ids": p["ids"], "logit_positions": rows}
        if long:
            # Smallest relative gap at any layer's top-k boundary: an engine computing the same
            # function in f32 selects the same keys when this is well above its rounding error.
            entry["indexer_topk_min_relative_margin"] = gf.indexer_margins(model, ids)
            for j, v in captured.items():
                tensors[f"indexer_topk.{j}"] = v
            meta["indexer_topk_prompt"] = i
        meta["logit_prompts"].append(entry)

    eos = model.config.eos_token_id
    for p in greedy_prompts:
        seq = torch.tensor([p["ids"]])
        out, margin = [], 1.0
        for _ in range(GREEDY_TOKENS):
            last = model(seq, use_cache=False).logits[0, -1].float()
            top2 = torch.topk(last, 2).values
            margin = min(margin, float((top2[0] - top2[1]) / last.abs().max()))
            nxt = int(torch.argmax(last))
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        shown = out[: out.index(eos)] if eos in out else out
        indexer_margin = gf.indexer_margins(model, seq) if seq.shape[1] > model.config.index_topk else None
        meta["greedy"].append({"id": p["id"], "prompt_ids": p["ids"], "greedy_ids": out,
                               "min_relative_margin": margin,
                               "indexer_topk_min_relative_margin": indexer_margin,
                               "prompt_text": tokenizer.decode(p["ids"], skip_special_tokens=False),
                               "text_until_eos": tokenizer.decode(shown, skip_special_tokens=False)})

    sums = {}
    for w in windows:
        ids = torch.tensor([w["ids"]])
        logits = model(ids[:, :-1], use_cache=False).logits[0].float()
        loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        s = sums.setdefault(w["source"], [0.0, 0])
        s[0] += float(loss)
        s[1] += ids.shape[1] - 1
    tot = [sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())]
    for source, (l, n) in list(sums.items()) + [("all", tot)]:
        meta["heldout"][source] = {"loss": l / n, "ppl": math.exp(l / n), "tokens": n}
    meta["heldout_windows"] = windows
    return tensors, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory of train.py (hf/, tokenizer.json)")
    ap.add_argument("--data", required=True, help="data directory of data.py (eval.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-shard-mb", type=float, default=15.0)
    ap.add_argument("--max-total-mb", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import DeepseekV32ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    tokenizer = Tokenizer.from_file(os.path.join(args.run, "tokenizer.json"))
    model = DeepseekV32ForCausalLM.from_pretrained(
        os.path.join(args.run, "hf"), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").eval()
    cfg = model.config
    with open(os.path.join(args.run, "run.json")) as f:
        run = json.load(f)
    context = run["args"]["context"] or 512
    assert tokenizer.get_vocab_size(True) == cfg.vocab_size
    assert tokenizer.token_to_id("<｜begin▁of▁sentence｜>") == cfg.bos_token_id
    assert tokenizer.token_to_id("<｜end▁of▁sentence｜>") == cfg.eos_token_id

    eval_docs = read_jsonl(os.path.join(args.data, "eval.jsonl"))
    logit_prompts, greedy_prompts = choose_prompts(eval_docs, tokenizer, cfg.index_topk, cfg.max_position_embeddings)
    windows = heldout_windows(eval_docs, tokenizer, min(context, cfg.max_position_embeddings - 1))

    # Quality cost of the storage format: held-out loss before and after quantization.
    _, before = reference(model, [], [], windows, tokenizer)

    state = gf.checkpoint_state(model)
    saved, values = quantize_state(state)
    gf.load_checkpoint_state(model, values)

    n_shards = write_shards(saved, args.out, int(args.max_shard_mb * 1e6))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(released_config(cfg), f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}, f,
                  indent=2)
    shutil.copy(os.path.join(args.run, "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                   "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                   "pad_token": "<｜▁pad▁｜>", "model_max_length": cfg.max_position_embeddings}, f, indent=2,
                  ensure_ascii=False)

    tensors, meta = reference(model, logit_prompts, greedy_prompts, windows, tokenizer)
    rot = model.model.rotary_emb
    tensors["rope_inv_freq"] = rot.inv_freq.float().contiguous()
    save_file(tensors, os.path.join(args.out, "expected.safetensors"))

    # Read the files back and recompute: the reference must follow from what was written.
    torch.set_grad_enabled(False)
    fresh = DeepseekV32ForCausalLM(cfg).float().eval()
    gf.load_checkpoint_state(fresh, dequantize_files(args.out))
    for i, p in enumerate(meta["logit_prompts"]):
        got = fresh(torch.tensor([p["prompt_ids"]]), use_cache=False).logits[0].float()[p["logit_positions"]]
        err = float((got - tensors[f"logits.{i}"]).abs().max())
        assert err == 0.0, f"logits of prompt {i} differ by {err} after reading the export back"

    meta.update({
        "generator": "train/export.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "run": {k: run[k] for k in ("shape", "steps", "tokens", "parameters", "active_parameters")},
        "heldout_before_quantization": before["heldout"],
        "rope_attention_scaling": float(rot.attention_scaling),
        "softmax_scale": float(model.model.layers[0].self_attn.scaling),
        "greedy_tokens": GREEDY_TOKENS,
    })
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)

    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
    total = sum(sizes.values())
    biggest = max(sizes.values())
    for n, s in sizes.items():
        print(f"{s / 1e6:9.3f} MB  {n}")
    print(f"total {total / 1e6:.3f} MB in {len(sizes)} files, {n_shards} weight shards")
    print("held-out perplexity: bf16/f32 weights", json.dumps({k: round(v["ppl"], 3) for k, v in before["heldout"].items()}),
          "-> as stored (FP8)", json.dumps({k: round(v["ppl"], 3) for k, v in meta["heldout"].items()}))
    for g in meta["greedy"]:
        print(f"{g['id']}: {g['text_until_eos'][:120]!r} (margin {g['min_relative_margin']:.2e})")
    assert biggest <= args.max_shard_mb * 1e6, f"a file is {biggest / 1e6:.1f} MB"
    assert total <= args.max_total_mb * 1e6, f"the export is {total / 1e6:.1f} MB"


if __name__ == "__main__":
    main()
