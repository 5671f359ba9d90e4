#!/usr/bin/env python3
"""Compare the engine binary with an export's reference (expected.json / expected.safetensors):
logits of the held-out prompts (`score`) and the greedy continuations (`generate`).

  python3 train/check_engine.py --model model/ --engine target/release/deepseek-engine [--backend cpu]

Prints, per prompt, the largest logit error relative to the largest reference logit of its row,
and, per greedy prompt, how many tokens match before the first difference. Exits non-zero when
a logit error exceeds --rtol or a continuation differs (use --report-only on low-precision paths).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def run(engine, args):
    res = subprocess.run([engine] + args, capture_output=True)
    if res.returncode != 0:
        sys.exit(f"{engine} {args[0]} failed:\n{res.stderr.decode()[-2000:]}")
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine", default="target/release/deepseek-engine")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--extra", default="", help="extra engine flags, e.g. '--weight-dtype bf16'")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    from safetensors.numpy import load_file

    with open(os.path.join(args.model, "expected.json")) as f:
        meta = json.load(f)
    ref = load_file(os.path.join(args.model, "expected.safetensors"))
    common = ["--model", args.model, "--backend", args.backend] + args.extra.split()
    ok = True
    worst = 0.0
    for i, p in enumerate(meta["logit_prompts"]):
        ids = ",".join(map(str, p["prompt_ids"]))
        got = np.array(run(args.engine, ["score"] + common + ["--prompt-ids", ids])["logits"], dtype=np.float64)
        want = ref[f"logits.{i}"].astype(np.float64)
        got = got[p["logit_positions"]]
        rel = float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max())
        worst = max(worst, rel)
        ok &= rel <= args.rtol
        print(f"logits {p['id']} ({len(p['prompt_ids'])} tokens): max relative error {rel:.2e}")
    matched = []
    for g in meta["greedy"]:
        ids = ",".join(map(str, g["prompt_ids"]))
        out = run(args.engine, ["generate"] + common + ["--prompt-ids", ids, "--max-tokens",
                                                       str(len(g["greedy_ids"])), "--ignore-eos"])["token_ids"]
        n = next((k for k, (a, b) in enumerate(zip(out, g["greedy_ids"])) if a != b), min(len(out), len(g["greedy_ids"])))
        matched.append(n)
        ok &= n == len(g["greedy_ids"])
        print(f"greedy {g['id']}: {n}/{len(g['greedy_ids'])} tokens before the first difference")
    print(json.dumps({"max_relative_logit_error": worst, "mean_greedy_tokens_matched": sum(matched) / len(matched)}))
    if not ok and not args.report_only:
        sys.exit(1)


if __name__ == "__main__":
    main()
