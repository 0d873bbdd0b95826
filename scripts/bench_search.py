"""Reward against wall-clock for Best-of-N and Speculative Rejection on the real model (SmolLM2-135M-Instruct) with
the VADER sentiment reward, as in the Speculative Rejection paper's figure, and beside them the SSS paper's other baselines (ARGS, CARDS, item-level
rejection sampling, TreeBoN with the shipped aligned / SFT heads) and the step-level GSI and RSD.

    .venv/bin/python scripts/bench_search.py
        # ~10 minutes on 2 CPU cores; writes results/bench_search.json and results/bench_search.png, prints a table
    .venv/bin/python scripts/bench_search.py --no-baselines   # BoN and SpR only

BoN(n) runs once per n (n = 1, 2, 4, ..., n_max, or the sizes in `--bon-ns`) with all prompts in one batch; SpR
runs from n_init = n_max rows per prompt with each alpha and decision points `--stops`, or with the explicit
configurations of `--spr` ("n_init:stops:alpha;...", e.g. "128:4,16:0.875;128:8:0.75"). Wall-clock is decode +
reward time (compiles excluded, every shape is compiled before it is timed; SpR's per-round times are in the JSON)
and is also given relative to BoN(1). The improvement score is the paper's
100 * (1 + mean_p (best_p - best_ref_p) / (max_ref_p - min_ref_p)) with BoN(n_max) as the reference (= 100).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT_SETS = {
    # short answers (the first runs in docs/benchmarks.md)
    "short": ["Describe what you did this morning.", "Write two sentences about the weather today.",
              "Tell me about your neighbour's dog.", "What do you think of Mondays?"],
    # open prompts whose answers mostly fill 128 tokens and whose sentiment varies from sample to sample: picked by
    # hand, before any SpR run, from a probe of 8 prompts x 8 samples of 128 tokens (seed 5)
    "open": ["Tell me about your commute to work.", "Write a paragraph about a rainy day in the city.",
             "Tell me a short story about a lost cat.", "Describe waiting for a delayed flight at the airport.",
             "Write a short review of the last restaurant you visited.", "What do you think of Mondays?"],
}
PROMPTS = PROMPT_SETS["short"]


def run_baselines(a, lm, prompts, reward, kw):
    """ARGS, CARDS, RS, TreeBoN, GSI and RSD on the same prompts; every shape is run once untimed first."""
    import numpy as np

    import rss_jax as rj
    heads = dict(dpo=rj.load("smollm2-135m-instruct-head-aligned"), sft=rj.load("smollm2-135m-instruct-head-sft"))
    small = rj.load(a.small) if a.small else lm
    n_new = a.max_new_tokens
    runs = [
        ("args", "ARGS k10 w1.5", lambda: rj.args(lm, prompts, reward, k=10, weight=1.5, max_new_tokens=n_new,
                                                   seed=a.seed)),
        ("args_authors", "ARGS authors k40", lambda: rj.args(lm, prompts, reward, mode="authors_code",
                                                             max_new_tokens=n_new, seed=a.seed)),
        ("cards", "CARDS", lambda: rj.cards(lm, prompts, reward, tau_r=a.tau_r, **kw)),
        ("rs", "RS", lambda: rj.rejection_sampling(lm, prompts, reward, tau_r=a.tau_r, **kw)),
        ("treebon", "TreeBoN 16/4/4 heads", lambda: rj.treebon(lm, prompts, reward, n=16, n_children=4,
                                                               n_layers=4, **heads, **kw)),
        ("gsi", "GSI n16" + ("" if a.small else " small=target"),
         lambda: rj.gsi(small, lm, prompts, reward, n=16, max_new_tokens=n_new, seed=a.seed)),
        ("rsd", "RSD d0.7" + ("" if a.small else " small=target"),
         lambda: rj.rsd(small, lm, prompts, reward, delta=0.7, max_new_tokens=n_new, seed=a.seed)),
    ]
    rows = []
    for method, label, fn in runs:
        fn()  # compile every shape this run meets
        out = fn()
        st = out.stats
        gen = st.get("generated_tokens", st.get("small_tokens", 0) + st.get("big_tokens", 0))
        rows.append(dict(method=method, label=label, n=None, alpha=None, reward=float(np.mean(out.scores)),
                         scores=np.asarray(out.scores).tolist(), wall_s=st["wall_s"], compile_s=st.get("compile_s"),
                         generated_tokens=int(gen or st.get("tokens_generated", 0)),
                         rm_tokens=int(st.get("reward_tokens", st.get("rm_tokens", 0)) or 0),
                         target_forwards=int(st.get("target_forwards", st.get("big_calls", 0))),
                         small_forwards=int(st.get("small_forwards", st.get("small_calls", 0)) or 0),
                         reward_calls=int(st.get("reward_calls", 0)), sequential=st.get("sequential"),
                         acceptance=st.get("acceptance_rate"), tokens=int(out.lengths.sum())))
        print(f"  {label:24s} reward {rows[-1]['reward']:+.4f}  wall {st['wall_s']:7.2f}s  target forwards "
              f"{rows[-1]['target_forwards']}  reward calls {rows[-1]['reward_calls']}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-set", default="short", choices=sorted(PROMPT_SETS))
    p.add_argument("--prompts", type=int, default=2, help="how many prompts of the set")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--n-max", type=int, default=128)
    p.add_argument("--bon-ns", default=None, help="BoN sizes to run, e.g. 1,4,16,64 (default: powers of two up to "
                   "--n-max; --n-max is always run, it is the reference)")
    p.add_argument("--n-init", type=int, default=None, help="SpR's initial population (default: --n-max)")
    p.add_argument("--spr", default=None, help="SpR configurations n_init:stops:alpha separated by ';' (instead of "
                   "--n-init/--stops/--alphas)")
    p.add_argument("--alphas", default="0.5,0.75,0.9")
    p.add_argument("--stops", default="4,8,16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="skip ARGS, CARDS, RS, TreeBoN, GSI and RSD")
    p.add_argument("--tau-r", type=float, default=0.9, help="CARDS' and RS's reward threshold (VADER scale)")
    p.add_argument("--small", default=None, help="GSI's and RSD's small model (a model folder or name; default: "
                   "the target itself, which makes GSI a step-level soft BoN and RSD plain decoding with checks)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_search.json"))
    a = p.parse_args()

    import numpy as np

    import rss_jax as rj
    from rss_jax.decoding.speculative_rejection import improvement_score

    t0 = time.perf_counter()
    lm = rj.load(a.model)
    reward = rj.rewards.vader_reward(lm.tokenizer)
    prompts = PROMPT_SETS[a.prompt_set][: a.prompts]
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    print(f"loaded {a.model} in {time.perf_counter() - t0:.1f}s; {len(prompts)} prompts, {a.max_new_tokens} new "
          f"tokens, T={a.temperature}", flush=True)

    rows = []
    ns = [1 << k for k in range(a.n_max.bit_length()) if (1 << k) <= a.n_max]
    if a.bon_ns:
        ns = sorted({int(x) for x in a.bon_ns.split(",") if int(x) <= a.n_max} | {a.n_max})
    bon = {}
    for n in ns:
        out = rj.best_of_n(lm, prompts, reward, n=n, **kw)  # wall_s excludes the compile (compile_s)
        comp = out.stats["compile_s"]
        bon[n] = out
        rows.append(dict(method="bon", n=n, alpha=None, reward=float(np.mean(out.scores)),
                         scores=out.scores.tolist(),
                         wall_s=out.stats["wall_s"], compile_s=comp,
                         generated_tokens=out.stats["generated_tokens"], rm_tokens=out.stats["rm_tokens"],
                         target_forwards=out.stats["target_forwards"], reward_calls=out.stats["reward_calls"]))
        print(f"  bon n={n:4d}  reward {rows[-1]['reward']:+.4f}  wall {out.stats['wall_s']:7.2f}s", flush=True)
    ref = bon[ns[-1]]
    if a.spr:
        configs = [(int(c.split(":")[0]), [int(x) for x in c.split(":")[1].split(",")], float(c.split(":")[2]))
                   for c in a.spr.split(";")]
    else:
        configs = [(a.n_init or ns[-1], [int(s) for s in a.stops.split(",")], float(x)) for x in a.alphas.split(",")]
    for n_init, stops, alpha in configs:
        out = rj.speculative_rejection(lm, prompts, reward, alpha=alpha, n_init=n_init, stops=stops,
                                       reference=ref if n_init <= ref.candidate_scores.shape[1] else None, **kw)
        comp = out.stats["compile_s"]
        rows.append(dict(method="spr", n=n_init, alpha=alpha, reward=float(np.mean(out.scores)),
                         scores=out.scores.tolist(),
                         wall_s=out.stats["wall_s"], compile_s=comp, generated_tokens=out.stats["generated_tokens"],
                         rm_tokens=out.stats["rm_tokens"], schedule=out.stats["schedule"],
                         target_forwards=out.stats["target_forwards"], reward_calls=out.stats["reward_calls"],
                         stops=out.stats["stops"], cutoffs=out.stats["cutoffs"], round_s=out.stats["round_s"],
                         reward_s=out.stats["reward_s"],
                         bon_best_survived=out.stats.get("bon_best_survived")))
        print(f"  spr n_init={n_init} a={alpha:.4g} stops={stops}  reward {rows[-1]['reward']:+.4f}  wall "
              f"{out.stats['wall_s']:7.2f}s  schedule {out.stats['schedule']}  rounds "
              f"{[round(x, 2) for x in out.stats['round_s']]}", flush=True)
    if not a.no_baselines:
        rows += run_baselines(a, lm, prompts, reward, kw)
    base = rows[0]["wall_s"]
    for r in rows:
        r["relative_wall"] = r["wall_s"] / base
        r["improvement"] = improvement_score(r["scores"], ref.candidate_scores)
    # the goal: SpR reaches BoN(n)'s reward for n >= 64 with >= 4x less wall-clock
    goal = []
    for n in [n for n in ns if n >= 64]:
        b = next(r for r in rows if r["method"] == "bon" and r["n"] == n)
        for r in rows:
            if r["method"] == "spr" and r["reward"] >= b["reward"]:
                goal.append(dict(bon_n=n, alpha=r["alpha"], speedup=b["wall_s"] / r["wall_s"]))
    ref_wall = next(r for r in rows if r["method"] == "bon" and r["n"] == ns[-1])["wall_s"]
    print(f"\n{'method':22s} {'n':>5s} {'alpha':>6s} {'stops':>9s} {'reward':>8s} {'improv':>7s} {'wall_s':>8s} "
          f"{'rel':>7s} {f'vs{ns[-1]}':>6s} {'tokens':>7s} {'target_fw':>9s} {'rm_calls':>8s}")
    for r in rows:
        st = ",".join(map(str, r["stops"][:-1])) if r["method"] == "spr" else ""
        print(f"{r.get('label', r['method']):22s} {r['n'] or 0:5d} {'' if r['alpha'] is None else r['alpha']:>6} "
              f"{st:>9s} {r['reward']:+8.4f} {r['improvement']:7.1f} {r['wall_s']:8.2f} {r['relative_wall']:7.2f} "
              f"{ref_wall / r['wall_s']:5.2f}x {r['generated_tokens']:7d} {r.get('target_forwards') or 0:9d} "
              f"{r.get('reward_calls') or 0:8d}")
    print("SpR reaching BoN(n>=64)'s reward:", goal or "none")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    res = dict(args=vars(a), prompts=prompts, rows=rows, goal=goal, total_s=time.perf_counter() - t0,
               command="python scripts/bench_search.py " + " ".join(sys.argv[1:]))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], "relative_wall", "wall-clock relative to BoN(1) (log)"),
                             (axes[1], "target_forwards", "target forwards (batched calls, log)")):
        b = [r for r in rows if r["method"] == "bon"]
        ax.plot([r[xkey] for r in b], [r["reward"] for r in b], "o-", label="Best-of-N")
        for r in b:
            ax.annotate(f"{r['n']}", (r[xkey], r["reward"]), fontsize=7)
        s_ = [r for r in rows if r["method"] == "spr"]
        ax.plot([r[xkey] for r in s_], [r["reward"] for r in s_], "s", label="SpR")
        for r in rows:
            if r["method"] not in ("bon", "spr"):
                ax.plot([r[xkey]], [r["reward"]], "^", label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean VADER reward of the answer")
    axes[0].set_title(f"{a.model}, {len(prompts)} prompts, {a.max_new_tokens} tokens")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png = os.path.splitext(a.out)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {a.out} and {png} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
