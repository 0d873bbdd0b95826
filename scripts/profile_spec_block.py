"""Wall-clock per block (per step for AR and EFT) of the decode loops with the shipped heads, to compare with the
timed forwards of scripts/bench_speculative.py's cost model and find what else a block spends time on.

--drop-mean-c replaces the SSS loop's mean_c statistic (three tempered log-softmaxes and a logsumexp over the
[K+1, V] rows, for `stats["mean_c"]` only) by zeros, so the difference of two runs is that statistic's cost. Run
each variant in its own process (the compiled loops are cached per process).

    .venv/bin/python scripts/profile_spec_block.py ar sd eft sss
    .venv/bin/python scripts/profile_spec_block.py --drop-mean-c sss
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", choices=["ar", "sd", "eft", "sss"])
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts, each decoded alone")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--drop-mean-c", action="store_true")
    a = p.parse_args()

    import jax.numpy as jnp

    import rss_jax as rj
    from rss_jax.decoding import speculative
    if a.drop_mean_c:
        speculative.sampling.mean_c = lambda lt, lr, ls, t, shift=1.0: jnp.zeros(lt.shape[:-1], jnp.float32)
    lm = rj.load("smollm2-135m-instruct")
    sft, aligned = rj.load("smollm2-135m-instruct-head-sft"), rj.load("smollm2-135m-instruct-head-aligned")
    with open(os.path.join(ROOT, "data", "prompts_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:a.prompts]
    common = dict(max_new_tokens=a.new_tokens, temperature=0.8, eos=[])
    for method in a.methods:
        kw = {"ar": {}, "sd": dict(draft=sft, k=a.k), "sss": dict(draft=aligned, sft=sft, k=a.k),
              "eft": dict(draft=aligned, sft=sft)}[method]
        rj.generate(lm, prompts[:1], method=method, seed=0, **kw, **common)  # compile
        outs = [rj.generate(lm, [q], method=method, seed=i, **kw, **common) for i, q in enumerate(prompts)]
        wall = sum(o.stats["wall_s"] for o in outs)
        new = sum(o.stats["new_tokens"] for o in outs)
        blocks = sum(o.stats.get("blocks", o.stats.get("steps", 0)) for o in outs)
        print(f"{method}{' (mean_c dropped)' if a.drop_mean_c else ''}: {new / wall:.1f} tok/s, "
              f"{1e3 * wall / max(blocks, 1):.2f} ms per block or step, {new / max(blocks, 1):.2f} tokens per block",
              flush=True)


if __name__ == "__main__":
    main()
