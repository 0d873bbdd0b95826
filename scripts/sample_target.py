"""Sample the target's own responses to a prompt file, appending to a JSONL file as it goes (resumable).

Each output line: {"i": prompt index, "r": response number, "prompt_ids": [...], "response_ids": [...]}. A rerun
skips the (prompt, response) pairs already in the file, so it can be stopped and restarted at any point. These are
the training data of the feature-draft heads (`training.heads`): the text speculative decoding will see.

    python scripts/sample_target.py --prompts data/prompts_train.jsonl --out ~/.cache/rss_jax/head_data/train.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tqdm  # noqa: E402

import rss_jax  # noqa: E402


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def done_pairs(path: str) -> set:
    seen = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: dropped, its pair is sampled again
                    continue
                seen.add((row["i"], row["r"]))
    return seen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "data", "prompts_train.jsonl"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--responses", type=int, default=1, help="responses per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--max-total", type=int, default=None,
                    help="stop after this many responses in all (jobs run response 0 of every prompt first, then "
                    "response 1, ...; the shipped heads used 2432 = 1680 + 752)")
    a = ap.parse_args()

    texts = read_prompts(a.prompts)[: a.limit]
    seen = done_pairs(a.out)
    jobs = [(i, r) for r in range(a.responses) for i in range(len(texts))][: a.max_total]
    jobs = [j for j in jobs if j not in seen]
    print(f"{len(seen)} responses already in {a.out}; sampling {len(jobs)} more", flush=True)
    if not jobs:
        return
    lm = rss_jax.load(a.model)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "a") as f:
        for s in tqdm.trange(0, len(jobs), a.batch, desc="target samples", unit="batch"):
            part = jobs[s:s + a.batch]
            # one seed per (first job of the batch): reruns of a finished batch are skipped, not resampled
            res = rss_jax.generate(lm, [texts[i] for i, _ in part], max_new_tokens=a.new_tokens,
                                   temperature=a.temperature, seed=a.seed + 100003 * part[0][1] + part[0][0])
            for (i, r), ids, row, n in zip(part, res.prompt_ids, res.tokens, res.lengths):
                f.write(json.dumps({"i": i, "r": r, "prompt_ids": ids, "response_ids": row[:n].tolist()}) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
