"""Speculative engine speed on the real SmolLM2-135M-Instruct: AR, SD, EFT and SSS measured in one run.

    .venv/bin/python scripts/bench_speculative.py              # drafts of `make drafts` (else truncated), K in 2, 4, 8
    .venv/bin/python scripts/bench_speculative.py --draft DIR --sft DIR
    .venv/bin/python scripts/bench_speculative.py --layers 0,1,2,3,28,29   # an untrained layer-truncated draft

For every K: tokens/s, acceptance, alpha_hat and tokens per target call of SD and SSS (exact mode), next to AR and
EFT (same distribution as exact SSS, three forwards per token). The *theoretical* speed-up over AR of a block is
E[tokens] / cost, E[tokens] = (1 - a^(K+1)) / (1 - a) with a = alpha_hat, and c = the measured cost of one draft step
relative to one target step: SD costs 1 + K c per block (K draft steps, one target verification); SSS costs
1 + (K + 1) c + c (one more draft step gives the aligned draft's row K; the SFT draft verifies the block).
A verification of K+1 tokens is counted as one target step (memory-bound decoding). measured / theoretical shows the
engine's overhead.
For SSS rows the table also gives the alpha_hat at which this cost model would put SSS at 2x EFT (the issue's goal).
Batch 1, eos disabled (every run makes exactly --new-tokens tokens), best of --repeats runs after a compile run.
Writes results/bench_speculative.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["Write a short, kind note to a friend who is sad.", "Explain photosynthesis to a child.",
           "Give me three tips for a good night's sleep."]


def alpha_for_speedup(target: float, k: int, c: float):
    """The per-token acceptance at which SSS (cost 1 + (K+2) c per block) would run `target` times faster than EFT
    (1 + 2c per token) by the same cost model; None if even alpha = 1 falls short at this K and c."""
    def speedup(a):
        expected = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        return (1 + 2 * c) * expected / (1 + (k + 2) * c)
    if speedup(1.0) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid) < target else (lo, mid)
    return hi


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", default=None, help="aligned draft folder (default: the drafts of `make drafts` if "
                    "present, else a layer-truncated copy of the target)")
    ap.add_argument("--sft", default=None, help="SFT draft for SSS/EFT (default: the draft)")
    ap.add_argument("--layers", default=None, help="use an untrained draft with these target layers, e.g. 0,1,2,29")
    ap.add_argument("--k", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-top-k", type=int, default=None,
                    help="filter the proposal to its top k (SPEC 2.5: the paper uses 40); the output law is unchanged")
    ap.add_argument("--out", default="results/bench_speculative.json")
    args = ap.parse_args()

    import rss_jax as rj
    from rss_jax.report import machine, table, write_json
    from training import make_draft

    lm = rj.load("smollm2-135m-instruct")
    if args.draft:
        draft = rj.load(args.draft)
        sft = rj.load(args.sft) if args.sft else draft
    elif args.layers:
        draft = sft = make_draft(lm, [int(x) for x in args.layers.split(",")])
    else:  # the trained drafts of `make drafts` when present, else untrained truncated copies (as the demo)
        from rss_jax.cli import demo_drafts
        draft, sft, what = demo_drafts(lm, argparse.Namespace(draft=None, sft=None, model="smollm2-135m-instruct"))
        print(what)
    common = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, eos=[], seed=0)

    reward = rj.rewards.vader_reward(lm.tokenizer)

    def run(model, **kw):
        """Best tokens/s over the prompts (batch 1 each), best of --repeats; stats summed over prompts; the mean
        VADER reward of the responses (which shows the reward shift of SSS against AR and SD)."""
        tot_tokens = tot_time = 0.0
        rewards = []
        acc = blocks = rej = 0
        for prompt in PROMPTS:
            rj.generate(model, [prompt], **kw, **common)  # compile
            best = None
            for _ in range(args.repeats):
                out = rj.generate(model, [prompt], **kw, **common)
                if best is None or out.stats["wall_s"] < best.stats["wall_s"]:
                    best = out
            s = best.stats
            rewards.append(float(reward.score(best.prompt_ids, [best.tokens[0][:best.lengths[0]].tolist()])[0]))
            tot_tokens += s["new_tokens"]
            tot_time += s["wall_s"]
            if "accepted" in s:
                acc += s["accepted"]
                blocks += s["blocks"]
                rej += sum(s["accepted_histogram"][:-1])
        res = {"tok/s": tot_tokens / tot_time, "tokens": tot_tokens, "wall s": tot_time,
               "VADER": sum(rewards) / len(rewards)}
        if blocks:
            k = kw.get("k", 0)
            res.update({"acceptance": acc / (k * blocks) if k else None,
                        "alpha_hat": acc / (acc + rej) if acc + rej else 0.0,
                        "tokens/target call": tot_tokens / blocks})
        return res

    ar = run(lm, method="ar")
    draft_ar = run(draft, method="ar")
    c = ar["tok/s"] / draft_ar["tok/s"]  # draft step cost relative to a target step
    eft = run(lm, method="eft", draft=draft, sft=sft)
    rows = [dict(method="ar", K=None, **ar, **{"vs ar": 1.0}),
            dict(method="draft alone (ar)", K=None, **draft_ar, **{"vs ar": draft_ar["tok/s"] / ar["tok/s"]}),
            dict(method="eft", K=None, **eft, **{"vs ar": eft["tok/s"] / ar["tok/s"]})]
    for k in args.k:
        for method in ("sd", "sss"):
            r = run(lm, method=method, draft=draft, sft=sft, k=k, draft_top_k=args.draft_top_k)
            a = r["alpha_hat"]
            expected = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
            theory = expected / (1 + k * c) if method == "sd" else expected / (1 + (k + 1) * c + c)
            measured = r["tok/s"] / ar["tok/s"]
            row = dict(method=method, K=k, **r, **{"vs ar": measured, "theory vs ar": theory,
                                                   "of theory": measured / theory})
            if method == "sss":  # EFT samples the same law at 1 + 2c per token
                row.update({"vs eft": r["tok/s"] / eft["tok/s"], "theory vs eft": theory * (1 + 2 * c),
                            "alpha for 2x eft": alpha_for_speedup(2.0, k, c)})
            rows.append(row)
        print(table(rows[-2:]), flush=True)
    cols = ["method", "K", "tok/s", "vs ar", "theory vs ar", "of theory", "vs eft", "theory vs eft",
            "alpha for 2x eft", "acceptance",
            "alpha_hat", "VADER",
            "tokens/target call"]
    title = (f"batch 1, {args.new_tokens} new tokens, T={args.temperature}, draft_top_k={args.draft_top_k}, "
             f"draft {draft.source} "
             f"(cost ratio c={c:.2f}), {machine()}")
    print()
    print(table(rows, cols, title=title))
    write_json(args.out, {"machine": machine(), "draft": draft.source, "sft": sft.source, "cost_ratio": c,
                          "rows": rows, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
