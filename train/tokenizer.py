#!/usr/bin/env python3
"""Train the built-in model's byte-level BPE tokenizer (HF `tokenizers`) on the training split.

The vocabulary has VOCAB_SIZE ids: DeepSeek-V3.2's special tokens first, spelled exactly as in
DeepSeek's tokenizer (BOS id 0 and EOS id 1, as config.json says), then the 256 byte symbols,
then the learned merges. Pre-tokenizer and decoder are GPT-2 style ByteLevel, as in DeepSeek's
tokenizer and the engine's own built-in one, so every string round-trips.

Added tokens and their `special` flag (the engine hides `special` tokens from replies when it
skips special tokens, except the thinking tags; the chat tags stay visible to the completion
parser, as in the engine's built-in tokenizer):
  <｜begin▁of▁sentence｜>  0  special     <｜end▁of▁sentence｜>  1  special
  <｜▁pad▁｜>              2  special     <｜User｜>             3
  <｜Assistant｜>           4              <think>               5
  </think>                6              ｜DSML｜               7 (tool-call tag prefix; plain
                                                               text to the parser, so not special)

The engine looks the tokens up by text (engine/src/tokenizer.rs: BOS, EOS, User, Assistant,
<think>, </think>; pad optional); none of them is split by BPE since they are added tokens.

  python3 train/tokenizer.py --data data/ [--out data/tokenizer.json]
"""

import argparse
import json
import os
import random
import re
import sys

VOCAB_SIZE = 8192

# (content, special): order fixes the ids.
SPECIAL_TOKENS = [
    ("<｜begin▁of▁sentence｜>", True),
    ("<｜end▁of▁sentence｜>", True),
    ("<｜▁pad▁｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<think>", False),
    ("</think>", False),
    ("｜DSML｜", False),
]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# WordNet is ~10x the other sources; the tokenizer sees a deterministic third of it.
SOURCE_KEEP = {"austen": 1.0, "chatterbot": 1.0, "wordnet": 0.34}

_SPLIT = re.compile("|".join(re.escape(t) for t, _ in SPECIAL_TOKENS))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def training_pieces(data_dir):
    rng = random.Random(0)
    for doc in read_jsonl(os.path.join(data_dir, "train.jsonl")):
        if rng.random() >= SOURCE_KEEP.get(doc["source"], 1.0):
            continue
        for piece in _SPLIT.split(doc["text"]):
            if piece:
                yield piece


def train(data_dir):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = None
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_pieces(data_dir), trainer=trainer)

    # The trainer marks every added token special; set the flags the engine expects.
    spec = json.loads(tok.to_str())
    flags = dict(SPECIAL_TOKENS)
    for t in spec["added_tokens"]:
        t["special"] = flags[t["content"]]
        t["normalized"] = False
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def verify(tok, data_dir):
    """Ids of the special tokens, vocabulary size, and round trips on held-out documents."""
    for i, (text, special) in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(text) == i, (text, tok.token_to_id(text))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size(True)
    docs = list(read_jsonl(os.path.join(data_dir, "eval.jsonl")))
    n_tokens, n_chars = {}, {}
    for doc in docs:
        ids = tok.encode(doc["text"], add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == doc["text"], doc["id"]
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID, doc["id"]
        if doc["kind"] == "chat":
            # The prompt the engine builds tokenizes to a prefix of the training text's tokens.
            reply = doc["messages"][-1]["content"]
            prompt = doc["text"][: len(doc["text"]) - len(reply) - len(SPECIAL_TOKENS[EOS_ID][0])]
            p_ids = tok.encode(prompt, add_special_tokens=False).ids
            assert ids[: len(p_ids)] == p_ids, doc["id"]
        n_tokens[doc["source"]] = n_tokens.get(doc["source"], 0) + len(ids)
        n_chars[doc["source"]] = n_chars.get(doc["source"], 0) + len(doc["text"])
    odd = "<｜User｜>明天 weather? 📅 tabs\tand\nnewlines</think>done<｜DSML｜function_calls><｜end▁of▁sentence｜>"
    ids = tok.encode(odd, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == odd
    hidden = tok.decode(ids, skip_special_tokens=True)
    assert "<｜end▁of▁sentence｜>" not in hidden and "</think>" in hidden and "｜DSML｜" in hidden
    return {s: {"tokens": n_tokens[s], "chars_per_token": round(n_chars[s] / n_tokens[s], 3)} for s in n_tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the data directory written by data.py")
    ap.add_argument("--out", default=None, help="tokenizer.json path (default DATA/tokenizer.json)")
    args = ap.parse_args()
    out = args.out or os.path.join(args.data, "tokenizer.json")
    tok = train(args.data)
    tok.save(out, pretty=False)
    from tokenizers import Tokenizer

    loaded = Tokenizer.from_file(out)
    report = verify(loaded, args.data)
    print(f"wrote {out}: {loaded.get_vocab_size(True)} ids; held-out documents: {json.dumps(report)}")
    sample = "<｜begin▁of▁sentence｜><｜User｜>What does serendipity mean?<｜Assistant｜></think>"
    enc = loaded.encode(sample, add_special_tokens=False)
    print(f"{sample!r} -> {enc.tokens}")


if __name__ == "__main__":
    sys.exit(main())
