"""Align a draft with DPO on VADER-sentiment preferences: the aligned draft pi_r that SSS needs next to pi_sft.

1. The SFT draft (e.g. the distilled draft of scripts/distill_draft.py) samples n responses per instruction
   (`rss_jax.best_of_n`, one prefill fanned out to n rows) and VADER scores them.
2. Pairs: chosen = the highest-scoring response, rejected = the lowest (pairs with equal scores are dropped).
3. DPO (`training.train`, sigmoid loss, reference = the frozen SFT draft) for --steps steps.
4. Held-out check, before and after, on the draft's own samples: the mean VADER reward, and two signs of reward
   hacking that the reward cannot see: the target's negative log-likelihood per response token (--target; text
   the unaligned target finds unlikely, such as strings of positive words, scores high) and the share of distinct
   bigrams in each response (repetition scores low).

    .venv/bin/python scripts/align_draft.py --sft ~/.cache/rss_jax/drafts/smollm2-135m-instruct-distilled \
        --save ~/.cache/rss_jax/drafts/smollm2-135m-instruct-aligned        # -> results/align_draft.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402

import rss_jax as rj  # noqa: E402
import training  # noqa: E402
from distill_draft import prompts  # noqa: E402
from rss_jax.report import write_json  # noqa: E402


def distinct_bigrams(ids) -> float:
    """The share of distinct bigrams among a response's bigrams (1.0 for responses under three tokens)."""
    pairs = list(zip(ids[:-1], ids[1:]))
    return len(set(pairs)) / len(pairs) if len(pairs) > 1 else 1.0


def held_out_check(model, target, texts, new_tokens, seed) -> dict:
    """The model's own samples on `texts`: mean VADER reward, the target's NLL per response token (the response
    text re-tokenized, mean over responses, as `rss-jax w2s` reports it) and the share of distinct bigrams."""
    from rss_jax.likelihood import response_nll
    out = rj.generate(model, texts, max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    resp = [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]
    reward = rj.rewards.vader_reward(model.tokenizer)
    nll, count = response_nll(target, texts, list(out.texts))
    return {"vader": float(np.mean(reward.score(out.prompt_ids, resp))),
            "target_nll_per_token": float(np.mean(nll[count > 0] / count[count > 0])),
            "distinct_bigrams": float(np.mean([distinct_bigrams(r) for r in resp]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", help="the SFT draft (folder or built-in name)")
    ap.add_argument("--save", help="where to write the aligned draft (rss_jax Orbax folder)")
    ap.add_argument("--check", nargs="+", metavar="MODEL",
                    help="no training: run the held-out check on these models (drafts, or the target) and write it")
    ap.add_argument("--n", type=int, default=4, help="samples per instruction for the preference pairs")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default="smollm2-135m-instruct",
                    help="the unaligned target whose likelihood of the held-out samples is reported (fluency)")
    ap.add_argument("--out", help="the report (default results/align_draft.json; with --check, "
                    "results/align_draft_check.json)")
    a = ap.parse_args()
    if not a.check and not (a.sft and a.save):
        ap.error("give --sft and --save to align a draft, or --check MODEL ... to measure models as they are")
    a.out = a.out or os.path.join(ROOT, "results", "align_draft_check.json" if a.check else "align_draft.json")
    t0 = time.perf_counter()
    target = rj.load(a.target)
    texts = prompts()
    np.random.default_rng(a.seed).shuffle(texts)
    held, train_texts = texts[:a.held_out], texts[a.held_out:]
    if a.check:
        rows = {}
        for name in a.check:
            rows[name] = held_out_check(target if name == a.target else rj.load(name), target, held, a.new_tokens,
                                        a.seed + 1000)
            print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
        write_json(a.out, {"command": " ".join(["python", *sys.argv]), "settings": vars(a), "held_out": rows,
                           "wall_s": time.perf_counter() - t0})
        return
    sft = rj.load(a.sft)
    reward = rj.rewards.vader_reward(sft.tokenizer)
    pairs = []
    for s in range(0, len(train_texts), 8):
        res = rj.best_of_n(sft, train_texts[s:s + 8], reward, n=a.n, max_new_tokens=a.new_tokens, seed=a.seed + s)
        for ids, cands, scores in zip(res.prompt_ids, res.candidates, res.candidate_scores):
            hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
            if scores[hi] > scores[lo]:
                pick = lambda i: [t for t in cands[i].tolist() if t >= 0]  # noqa: E731
                pairs.append({"prompt_ids": ids, "chosen_ids": pick(hi), "rejected_ids": pick(lo)})
    print(f"{len(pairs)} preference pairs from {len(train_texts)} instructions", flush=True)
    before = held_out_check(sft, target, held, a.new_tokens, a.seed + 1000)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        res = training.train(training.TrainConfig(
            mode="dpo", policy=sft, data=data, output=os.path.join(tmp, "run"), steps=a.steps,
            batch_size=a.batch_size, learning_rate=a.learning_rate, beta=a.beta, seed=a.seed, export=False))
    res.lm.save(a.save, overwrite=True)
    after = held_out_check(res.lm, target, held, a.new_tokens, a.seed + 1000)
    last = res.metrics[-1]
    for name, key in (("VADER reward", "vader"), ("target NLL per token", "target_nll_per_token"),
                      ("distinct bigrams", "distinct_bigrams")):
        print(f"held-out {name} of the draft's samples: {before[key]:.3f} before DPO, {after[key]:.3f} after")
    print(f"final DPO accuracy {last.get('accuracy')}, margin {last.get('margin')}; wrote {a.save}")
    write_json(a.out, {"command": " ".join(["python", *sys.argv]), "settings": vars(a), "pairs": len(pairs),
                       "held_out_reward_before": before["vader"], "held_out_reward_after": after["vader"],
                       "held_out_before": before, "held_out_after": after,
                       "final_metrics": last, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
