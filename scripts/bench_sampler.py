"""The categorical draw alone and inside the decoders: `jax.random.categorical` (one Gumbel variate per token)
against `rss_jax.sampling.categorical` (two uniforms per row, inverse CDF over blocks of 256 tokens; same law).

    .venv/bin/python scripts/bench_sampler.py                  # -> results/bench_sampler.json
    .venv/bin/python scripts/bench_sampler.py --no-end-to-end  # the draw alone

1. The draw alone: jitted, [B, 49152] float32 logits (SmolLM2's vocabulary), B in --rows; best of 10 calls. With
   it, the top-k filter (k 40, what Best-of-N and the search methods apply to the target) and `lax.top_k` alone,
   the floor under it.
2. End to end on the real SmolLM2-135M-Instruct (float32, T 0.8, one prompt, --new-tokens tokens, no EOS stop): plain
   decoding (batch 1), SD with the shipped SFT head (K 2, batch 1) and Best-of-64 (top-k 40, one prompt: 64 rows),
   the whole call as a user waits for it, compiles excluded. The two draws are swapped into `rss_jax.sampling` in
   turn (every compiled loop is dropped between), --rounds times, alternated so that a slow spell of the machine
   hits both; the table gives the median of each and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V = 49152
PROMPT = "Give me three tips for a relaxing weekend at home."


def gumbel_draw(key, logits):
    import jax
    import jax.numpy as jnp
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def best_ms(f, *args, repeats=10):
    """Best of `repeats` calls of the jitted f (ms), after one call that compiles it."""
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def draw_alone(rows):
    import jax

    from rss_jax import sampling
    out = []
    rng = np.random.default_rng(0)
    for b in rows:
        x = jax.numpy.asarray((rng.standard_normal((b, V)) * 3).astype(np.float32))
        keys = jax.random.split(jax.random.key(0), b)
        row = {"rows": b}
        for name, fn in (("gumbel", gumbel_draw), ("two-level", sampling.categorical)):
            row[f"{name} ms"] = best_ms(jax.jit(jax.vmap(fn)), keys, x)
        row["speed-up"] = row["gumbel ms"] / row["two-level ms"]
        row["top_k_filter(40) ms"] = best_ms(jax.jit(lambda x: sampling.top_k_filter(x, 40)), x)
        row["lax.top_k(40) alone ms"] = best_ms(jax.jit(lambda x: jax.lax.top_k(x, 40)[0]), x)
        out.append(row)
    return out


def end_to_end(new_tokens, rounds):
    import jax

    import rss_jax as rj
    from rss_jax import sampling
    from rss_jax.decoding import common
    lm = rj.load("smollm2-135m-instruct")
    sft = rj.load("smollm2-135m-instruct-head-sft")
    reward = rj.rewards.vader_reward(lm.tokenizer)
    kw = dict(max_new_tokens=new_tokens, temperature=0.8)
    cases = {
        "ar, batch 1": lambda s: rj.generate(lm, [PROMPT], method="ar", seed=s, eos=[], **kw),
        "sd K=2 (SFT head), batch 1": lambda s: rj.generate(lm, [PROMPT], method="sd", draft=sft, k=2, seed=s,
                                                           eos=[], **kw),
        "best-of-64, top-k 40": lambda s: rj.best_of_n(lm, [PROMPT], reward, n=64, top_k=40, seed=s, **kw),
    }
    draws = {"gumbel": gumbel_draw, "two-level": sampling.categorical}
    times = {(c, d): [] for c in cases for d in draws}
    tokens = {}
    for _ in range(rounds):
        for d, fn in draws.items():
            sampling.categorical = fn
            jax.clear_caches()
            common.COMPILED.entries.clear()
            for c, run in cases.items():
                run(0)  # compile
                for s in (1, 2):
                    t = time.perf_counter()
                    out = run(s)
                    wall = time.perf_counter() - t - float(out.stats.get("compile_s") or 0.0)
                    n = int(np.asarray(out.lengths).sum()) if c.startswith("best") else int(out.stats["new_tokens"])
                    tokens[c] = n
                    times[c, d].append(wall / n)
    sampling.categorical = draws["two-level"]
    rows = []
    for c in cases:
        g, t = float(np.median(times[c, "gumbel"])), float(np.median(times[c, "two-level"]))
        rows.append({"case": c, "gumbel ms/token": g * 1e3, "two-level ms/token": t * 1e3, "speed-up": g / t,
                     "calls each": len(times[c, "gumbel"]), "tokens per call": tokens[c]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 3, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--out", default="results/bench_sampler.json")
    args = ap.parse_args()

    from rss_jax.report import machine, table, write_json
    print(f"machine: {machine()}", flush=True)
    alone = draw_alone(args.rows)
    print(table(alone, title=f"the draw alone, [rows, {V}] float32 logits (ms per call)"), flush=True)
    e2e = None if args.no_end_to_end else end_to_end(args.new_tokens, args.rounds)
    if e2e:
        print(table(e2e, title=f"end to end, SmolLM2-135M-Instruct float32, T 0.8, {args.new_tokens} new tokens "
                    "(wall ms per returned token, median)"), flush=True)
    path = write_json(args.out, {"machine": machine(), "command": "scripts/bench_sampler.py " + " ".join(sys.argv[1:]),
                                 "vocabulary": V, "draw_alone": alone, "end_to_end": e2e,
                                 "new_tokens": args.new_tokens, "rounds": args.rounds})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
