"""Cost of the logit filters on the real model: one filter call on SmolLM2's 49152-token logits, and batch-1 AR
decoding with each filter, in one run.

    .venv/bin/python scripts/bench_filters.py            # -> results/bench_filters.json and a printed table

Per-call times are the mean over --calls jitted calls on the real next-token logits of a chat prompt at T = 0.8;
AR tokens/s is the best of --repeats runs of --new-tokens tokens (EOS disabled, compile excluded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILTERS = {"none": {}, "top_k 40": {"top_k": 40}, "top_p 0.9": {"top_p": 0.9}, "top_p 0.99": {"top_p": 0.99},
           "min_p 0.05": {"min_p": 0.05}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out", default="results/bench_filters.json")
    a = ap.parse_args()

    import jax

    import rss_jax as rj
    from rss_jax import sampling
    from rss_jax.report import machine, table, write_json

    lm = rj.load("smollm2-135m-instruct")
    prompt = "Write a short story about a rainy day."
    ids = rj.decoding.common.encode_prompts(lm, [prompt], chat=True)[0]
    logits = lm.logits([ids])[:, -1]
    rows = []
    for name, kw in FILTERS.items():
        f = jax.jit(lambda x, kw=kw: sampling.process_logits(x, a.temperature, **kw))
        f(logits).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            f(logits).block_until_ready()
        call_ms = (time.perf_counter() - t0) / a.calls * 1e3
        common = dict(max_new_tokens=a.new_tokens, temperature=a.temperature, eos=[], **kw)
        rj.generate(lm, [prompt], **common)  # compile
        best = min(rj.generate(lm, [prompt], seed=s, **common).stats["wall_s"] for s in range(a.repeats))
        rows.append({"filter": name, "filter call ms": call_ms, "AR tok/s": a.new_tokens / best})
        print(rows[-1], flush=True)
    base = rows[0]["AR tok/s"]
    for r in rows:
        r["vs none"] = r["AR tok/s"] / base
    print(table(rows, ["filter", "filter call ms", "AR tok/s", "vs none"],
                title=f"SmolLM2-135M-Instruct, batch 1, T={a.temperature}, {machine()}"))
    write_json(a.out, {"machine": machine(), "rows": rows, "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
