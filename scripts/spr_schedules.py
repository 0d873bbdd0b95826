"""Offline design of Speculative Rejection schedules from one Best-of-N population.

SpR uses BoN's PRNG keys (global row id, position), so a row SpR keeps is token for token the BoN row of the same
index. One population of n_pop rows per prompt, with every row's tokens, therefore tells for *any* schedule
(n_init <= n_pop, decision points, alpha) which rows SpR keeps, what it answers and how many tokens it generates,
without running it. This script replays `run_population`'s host loop exactly:
  * at a decision point `stop` every live row is scored on its first min(stop, length) tokens with the same reward
    (a row that finished keeps its final score, which is the score of the same tokens);
  * the best keep_count(n, alpha) rows per prompt survive (score descending, ties to the lowest row index);
  * finished rows stay candidates whether kept or not; the answer is the best finished row (ties: lowest index);
  * generated tokens = every row's tokens up to the stop it was pruned at (or its length);
  * decode steps per round end early when every row of the batch (all prompts) is done, as the compiled loop does.
Wall-clock is estimated with a per-step cost model c0 + c1 * rows (calibrated here: `--calibrate`) plus the reward
time per scored row, and BoN(n) for n <= n_pop is read from the same population (first n rows).

    .venv/bin/python scripts/spr_schedules.py --prompt-set open --prompts 4 --max-new-tokens 128 --n-pop 128 --seed 1 \
        --calibrate --out results/spr_schedules.json
    # add --verify 128:4,16:0.75 to run one real rj.speculative_rejection and compare it with the replay

The population is cached (npz next to --out), so re-running with other schedules costs only the reward scoring.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402


def generate_population(lm, prompt_ids, cfg, n_pop: int, chunk: int, seed: int):
    """tokens [B, n_pop, T] (-1 padded): BoN(n_pop)'s rows, generated `chunk` rows per prompt at a time with the
    global row ids BoN gives them (row i of prompt b has id i * B + b), so they equal rj.best_of_n's candidates."""
    import jax
    import jax.numpy as jnp

    from rss_jax.decoding import common
    from rss_jax.decoding.best_of_n import global_row_ids, population_start
    bsz, nmax = len(prompt_ids), cfg.max_new_tokens
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    base_key = jax.random.key(seed)
    pool = np.full((bsz, n_pop, nmax), -1, np.int32)
    for c0 in range(0, n_pop, chunk):
        rows = np.tile(np.arange(c0, min(c0 + chunk, n_pop)), (bsz, 1))
        ids = jnp.asarray(global_row_ids(bsz, rows))
        (state, _), comp, run = common.COMPILED.call(population_start, (lm.graphdef, cfg, rows.shape[1]), lm.state,
                                                     tokens, lens, ids, base_key, jnp.asarray(nmax, jnp.int32))
        pool[:, c0: c0 + rows.shape[1]] = np.asarray(state[3]).reshape(bsz, rows.shape[1], nmax)
        print(f"  rows {c0}..{c0 + rows.shape[1] - 1}: {run:.1f}s (+{comp:.1f}s compile)", flush=True)
    return pool


def calibrate(lm, prompt_ids, cfg, seed: int, fanouts=(1, 32), steps: int = 32):
    """Per decode step cost c0 + c1 * rows (seconds), fitted on two batch sizes (steps 1..steps, no early exit)."""
    import jax
    import jax.numpy as jnp

    from rss_jax.decoding import common
    from rss_jax.decoding.autoregressive import sampler_config
    from rss_jax.decoding.best_of_n import global_row_ids, population_start
    cfg = sampler_config(lm, cfg.max_new_tokens, cfg.temperature, eos=[])  # never stops early
    bsz = len(prompt_ids)
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    pts = []
    for f in fanouts:
        ids = jnp.asarray(global_row_ids(bsz, np.tile(np.arange(f), (bsz, 1))))
        times = []
        for stop in (2, steps + 1):
            args = (lm.state, tokens, lens, ids, jax.random.key(seed), jnp.asarray(stop, jnp.int32))
            common.COMPILED.call(population_start, (lm.graphdef, cfg, f), *args)  # compile / warm up
            times.append(min(common.COMPILED.call(population_start, (lm.graphdef, cfg, f), *args)[2]
                             for _ in range(2)))
        pts.append((bsz * f, (times[1] - times[0]) / (steps - 1), times[0]))
    (r0, t0, p0), (r1, t1, p1) = pts
    c1 = (t1 - t0) / (r1 - r0)
    return dict(c0=t0 - c1 * r0, c1=c1, points=pts, prefill_s=p0)


def partial_scores(reward, prompt_ids, pool, stops):
    """{stop: [B, n] reward of each row's first min(stop, length) tokens}; the key T is the final score."""
    bsz, n, nmax = pool.shape
    out, t_rows, t_s = {}, 0, 0.0
    for s in sorted(set(stops) | {nmax}):
        t0 = time.perf_counter()
        resp = [pool[b, i, :s][pool[b, i, :s] >= 0].tolist() for b in range(bsz) for i in range(n)]
        prm = [prompt_ids[b] for b in range(bsz) for _ in range(n)]
        out[s] = np.asarray(reward.score(prm, resp), np.float64).reshape(bsz, n)
        t_s += time.perf_counter() - t0
        t_rows += len(resp)
    return out, t_s / t_rows


def replay(pool, scores, sizes, ends, cost=None):
    """Replay run_population's host loop on a population. -> dict(chosen [B], score [B], generated_tokens, steps,
    row_steps, rm_rows, survived rows per prompt, cutoffs, est_s)."""
    bsz, _, nmax = pool.shape
    n0 = sizes[0]
    length = (pool[:, :n0] >= 0).sum(-1)  # [B, n0]
    cand = np.full((bsz, n0), -np.inf)
    final = np.zeros((bsz, n0), bool)
    written = np.zeros((bsz, n0), np.int64)  # tokens in the pool per row
    rows = np.tile(np.arange(n0), (bsz, 1))
    bi = np.arange(bsz)[:, None]
    steps = row_steps = rm_rows = 0
    cutoffs = []
    start = 1
    for r, (n_r, stop) in enumerate(zip(sizes, ends)):
        last = r == len(sizes) - 1
        lr = length[bi, rows]
        # the compiled loop samples positions start .. stop-1 (position 0 comes with the prefill) and exits when
        # every row of the batch is done
        it = max(0, min(stop, int(lr.max())) - start)
        steps += it
        row_steps += it * bsz * n_r
        written[bi, rows] = np.minimum(lr, stop)
        done = (lr <= stop) | last
        new = done & ~final[bi, rows]
        cand[bi, rows] = np.where(new, scores[nmax][bi, rows], cand[bi, rows])
        final[bi, rows] |= new
        rm_rows += int(new.sum())
        if last:
            break
        cur = np.where(done, cand[bi, rows], scores[stop][bi, rows])
        rm_rows += int((~done).sum())
        order = np.lexsort((rows, -cur), axis=1)[:, : sizes[r + 1]]
        cutoffs.append(np.take_along_axis(cur, order[:, -1:], axis=1)[:, 0].tolist())
        rows = np.take_along_axis(rows, order, axis=1)
        start = stop
    chosen = np.argmax(cand, axis=1)
    res = dict(chosen=chosen.tolist(), score=cand[np.arange(bsz), chosen].tolist(),
               generated_tokens=int(written.sum()), steps=steps, row_steps=row_steps, rm_rows=rm_rows,
               cutoffs=cutoffs, final_rows=[np.flatnonzero(f).tolist() for f in final])
    if cost is not None:
        res["est_s"] = (cost["prefill_s"] + cost["c0"] * steps + cost["c1"] * row_steps
                        + cost["reward_s_per_row"] * rm_rows)
    return res


def batch1_cost(pool, scores, sizes, ends, c0: float, c1: float) -> float:
    """Decode cost of running each prompt alone (batch 1: its loop exits when its own rows are done), a step costing
    c0 + c1 * rows, summed over the prompts."""
    total = 0.0
    for b in range(pool.shape[0]):
        r = replay(pool[b: b + 1], {s: v[b: b + 1] for s, v in scores.items()}, sizes, ends)
        total += c0 * r["steps"] + c1 * r["row_steps"]
    return total


def bon(pool, scores, n, cost=None):
    """BoN(n) from the first n rows (one round to max_new_tokens)."""
    return replay(pool, scores, [n], [pool.shape[2]], cost)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-set", default="open", help="a key of bench_search.py's PROMPT_SETS")
    p.add_argument("--prompts", type=int, default=4, help="how many prompts of the set")
    p.add_argument("--prompts-file", default=None, help="a JSONL file of {\"prompt\": ...} lines (e.g. "
                   "data/prompts_train.jsonl) instead of --prompt-set; its first --prompts lines are used")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter on the target (the w2s runs use 40)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--n-pop", type=int, default=128, help="population rows per prompt (largest n_init and BoN n)")
    p.add_argument("--chunk", type=int, default=32, help="rows per prompt generated at a time")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-inits", default="64,128")
    p.add_argument("--stops", default="4;8;16;4,8;4,16;8,16;4,8,16;4,8,16,32;4,16,64;8,32",
                   help="decision-point sets separated by ';'")
    p.add_argument("--alphas", default="0.5,0.75,0.8,0.875,0.9,0.9375")
    p.add_argument("--bon-ref", type=int, default=64, help="the BoN size to reach (improvement-score reference)")
    p.add_argument("--calibrate", action="store_true", help="fit the per-step cost model on this machine")
    p.add_argument("--cost", default=None, help="c0,c1,reward_s_per_row[,prefill_s] (seconds) instead of "
                   "--calibrate")
    p.add_argument("--cost-b1", default="1,0.07", help="c0,c1: one prompt per call, a decode step costs c0 + c1 * "
                   "rows (roughly the w2s run on a 2-core AMD EPYC: BoN(16) 2.2x and BoN(64) 5.4x plain decoding per token)")
    p.add_argument("--verify", default=None, help="n_init:stops:alpha of one real SpR run to compare, e.g. "
                   "128:4,16:0.75")
    p.add_argument("--top", type=int, default=25, help="rows of the printed table")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "spr_schedules.json"))
    a = p.parse_args()

    import rss_jax as rj
    from bench_search import PROMPT_SETS
    from rss_jax.decoding import common
    from rss_jax.decoding.autoregressive import sampler_config
    from rss_jax.decoding.speculative_rejection import improvement_score, schedule

    lm = rj.load(a.model)
    reward = rj.rewards.vader_reward(lm.tokenizer)
    if a.prompts_file:
        from rss_jax.w2s import load_prompts
        prompts = load_prompts(a.prompts, a.prompts_file)
        set_name = os.path.splitext(os.path.basename(a.prompts_file))[0]
    else:
        prompts = PROMPT_SETS[a.prompt_set][: a.prompts]
        set_name = a.prompt_set
    prompt_ids = common.encode_prompts(lm, prompts, True)
    cfg = sampler_config(lm, a.max_new_tokens, a.temperature, a.top_k)
    # sampling settings other than the original T 1, no filter, are part of the cached population's name
    filt = "" if a.temperature == 1.0 and not a.top_k else f"_T{a.temperature:g}" + (f"_k{a.top_k}" if a.top_k else "")
    cache = (os.path.splitext(a.out)[0] + f"_pop_{set_name}{a.prompts}_s{a.seed}_n{a.n_pop}_t{a.max_new_tokens}"
             f"{filt}.npz")
    if os.path.exists(cache):
        pool = np.load(cache)["pool"]
        print(f"population from {cache}")
    else:
        t0 = time.perf_counter()
        pool = generate_population(lm, prompt_ids, cfg, a.n_pop, a.chunk, a.seed)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez_compressed(cache, pool=pool)
        print(f"population {pool.shape} in {time.perf_counter() - t0:.0f}s -> {cache}")
    set_stops = [[int(x) for x in s.split(",")] for s in a.stops.split(";")]
    set_stops = [s for i, s in enumerate(set_stops) if s not in set_stops[:i]]
    alphas = [float(x) for x in a.alphas.split(",")]
    n_inits = [int(x) for x in a.n_inits.split(",") if int(x) <= a.n_pop]
    verify = None
    if a.verify:
        vn, vs, va = a.verify.split(":")
        verify = (int(vn), [int(x) for x in vs.split(",")], float(va))
        if verify[1] not in set_stops:
            set_stops.append(verify[1])
    scores, rps = partial_scores(reward, prompt_ids, pool, {s for ss in set_stops for s in ss if s < a.max_new_tokens})
    cost = None
    if a.calibrate:
        cost = calibrate(lm, prompt_ids, cfg, a.seed)
        cost["reward_s_per_row"] = rps
        print(f"cost model: {cost['c0'] * 1e3:.1f} ms + {cost['c1'] * 1e3:.2f} ms/row per step, reward "
              f"{rps * 1e3:.2f} ms/row (points {cost['points']})")
    elif a.cost:
        c = [float(x) for x in a.cost.split(",")]
        cost = dict(c0=c[0], c1=c[1], reward_s_per_row=c[2], prefill_s=c[3] if len(c) > 3 else 0.0)
    length = (pool >= 0).sum(-1)
    print(f"{len(prompts)} prompts, {a.max_new_tokens} new tokens, seed {a.seed}: mean length "
          f"{length.mean():.1f}, at the budget {np.mean(length == a.max_new_tokens):.0%}")
    for s in sorted(scores):
        if s < a.max_new_tokens:
            rho = np.mean([np.corrcoef(scores[s][b], scores[a.max_new_tokens][b])[0, 1] for b in range(len(prompts))])
            print(f"  partial reward at {s:3d} tokens: mean per-prompt correlation with the final {rho:+.2f}")

    ref_scores = scores[a.max_new_tokens][:, : a.bon_ref]
    b1c0, b1c1 = (float(x) for x in a.cost_b1.split(","))
    rows = []
    ns = [1 << k for k in range(a.n_pop.bit_length()) if (1 << k) <= a.n_pop]
    for n in ns:
        r = bon(pool, scores, n, cost)
        r["b1_cost"] = batch1_cost(pool, scores, [n], [pool.shape[2]], b1c0, b1c1)
        rows.append(dict(method="bon", n=n, alpha=None, stops=None, schedule=[n], reward=float(np.mean(r["score"])),
                         improvement=improvement_score(r["score"], ref_scores), **r))
    for n0, stops, alpha in itertools.product(n_inits, set_stops, alphas):
        sizes, ends = schedule(n0, alpha, a.max_new_tokens, stops=stops)
        r = replay(pool, scores, sizes, ends, cost)
        r["b1_cost"] = batch1_cost(pool, scores, sizes, ends, b1c0, b1c1)
        rows.append(dict(method="spr", n=n0, alpha=alpha, stops=stops, schedule=sizes, ends=ends,
                         reward=float(np.mean(r["score"])), improvement=improvement_score(r["score"], ref_scores), **r))
    key = "est_s" if cost else "row_steps"
    bref = next(r for r in rows if r["method"] == "bon" and r["n"] == a.bon_ref)
    bref_se = float(np.std(bref["score"], ddof=1) / np.sqrt(len(prompts))) if len(prompts) > 1 else 0.0
    for r in rows:
        r["speedup"] = bref[key] / r[key]
        r["reaches_ref"] = r["reward"] >= bref["reward"]
        r["within_se"] = r["reward"] >= bref["reward"] - bref_se
        r["b1_speedup"] = bref["b1_cost"] / r["b1_cost"]
    print(f"BoN({a.bon_ref}) reward {bref['reward']:.4f} +- {bref_se:.4f} (s.e. over prompts)")
    spr = sorted((r for r in rows if r["method"] == "spr"),
                 key=lambda r: (-r["within_se"], -min(r["speedup"], r["b1_speedup"])))
    hdr = (f"{'method':6s} {'n':>4s} {'alpha':>6s} {'stops':>11s} {'schedule':>16s} {'reward':>7s} {'improv':>6s} "
           f"{'tokens':>7s} {'steps':>5s} {'row-steps':>9s} {'est_s' if cost else '':>7s} {'speedup':>7s} {'b1':>6s} "
           f"{'in s.e.':>7s}")
    print(f"\nBoN(n) read from the population, and SpR schedules (sorted: within one s.e. of BoN({a.bon_ref}) first, "
          f"then by the smaller of the two estimated speedups over it: batched, column speedup, and one prompt per "
          f"call, column b1)\n" + hdr)
    for r in [r for r in rows if r["method"] == "bon"] + spr[: a.top]:
        st = "" if r["stops"] is None else ",".join(map(str, r["stops"]))
        sc = "/".join(map(str, r["schedule"]))
        print(f"{r['method']:6s} {r['n']:4d} {'' if r['alpha'] is None else r['alpha']:>6} {st:>11s} {sc:>16s} "
              f"{r['reward']:+7.3f} {r['improvement']:6.1f} {r['generated_tokens']:7d} {r['steps']:5d} "
              f"{r['row_steps']:9d} {r.get('est_s', float('nan')):7.1f} {r['speedup']:6.2f}x {r['b1_speedup']:5.2f}x "
              f"{'yes' if r['within_se'] else 'no':>7s}")
    # the Pareto frontier: every schedule that beats the reward of all faster ones
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        if r["reward"] > best + 1e-12:
            best = r["reward"]
            front.append(r)
    print(f"\nPareto frontier (reward against estimated speedup over BoN({a.bon_ref}) = {bref['reward']:.4f})")
    for r in front:
        st = "" if r["stops"] is None else ",".join(map(str, r["stops"]))
        print(f"  {r['method']:4s} n={r['n']:4d} alpha={'' if r['alpha'] is None else r['alpha']:<6} stops={st:<10s} "
              f"schedule={'/'.join(map(str, r['schedule'])):<12s} reward {r['reward']:.4f} "
              + (f"({' '.join(f'{x:.3f}' for x in r['score'])})" if len(prompts) <= 8 else "")
              + f"  speedup {r['speedup']:.2f}x, b1 {r['b1_speedup']:.2f}x")
    # single-cut bound: at a decision point, how many rows must be kept (the same count for every prompt) for some
    # row as good as BoN(bon_ref)'s answer to survive, and what that costs in decode row-steps
    target = scores[a.max_new_tokens][:, : a.bon_ref].max(axis=1)
    need = []
    print(f"\nsingle cut: rows to keep at each decision point so that a row scoring >= BoN({a.bon_ref})'s answer "
          f"survives in every prompt")
    for n0 in n_inits:
        for s in sorted(x for x in scores if x < a.max_new_tokens):
            ks = []
            for b in range(len(prompts)):
                order = np.lexsort((np.arange(n0), -scores[s][b, :n0]))
                ks.append(int(np.flatnonzero(scores[a.max_new_tokens][b, :n0][order] >= target[b])[0]) + 1)
            k = max(ks)
            rs = n0 * s + k * (a.max_new_tokens - s)
            need.append(dict(n_init=n0, stop=s, keep_per_prompt=ks, keep=k, row_steps_per_prompt=rs,
                             vs_bon_ref=a.bon_ref * a.max_new_tokens / rs))
            print(f"  n_init {n0:4d} stop {s:3d}: keep per prompt {ks} -> {k:4d}; {rs:6d} row-steps per prompt, "
                  f"BoN({a.bon_ref}) / {need[-1]['vs_bon_ref']:.2f}")
    res = dict(args=vars(a), prompts=prompts, cost=cost, rows=rows, single_cut=need, bon_ref_se=bref_se,
               frontier=[dict(method=r["method"], n=r["n"], alpha=r["alpha"], stops=r["stops"], reward=r["reward"],
                              speedup=r["speedup"]) for r in front],
               command="python scripts/spr_schedules.py " + " ".join(sys.argv[1:]))

    if verify is not None:
        vn, vs, va = verify
        out = rj.speculative_rejection(lm, prompts, reward, alpha=va, n_init=vn, stops=vs,
                                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                       seed=a.seed)
        sizes, ends = schedule(vn, va, a.max_new_tokens, stops=vs)
        r = replay(pool, scores, sizes, ends, cost)
        real_tokens = np.asarray(out.tokens)
        want = pool[np.arange(len(prompts)), r["chosen"]]
        check = dict(
            schedule=out.stats["schedule"] == sizes,
            chosen=np.asarray(out.chosen).tolist() == r["chosen"],
            tokens=bool(np.array_equal(real_tokens, want)),
            scores=bool(np.allclose(np.asarray(out.scores, np.float64), r["score"])),
            generated_tokens=out.stats["generated_tokens"] == r["generated_tokens"],
            final_rows=out.stats["final_rows"] == r["final_rows"],
            cutoffs=bool(np.allclose(out.stats["cutoffs"], r["cutoffs"])))
        print(f"\nverify SpR n_init={vn} stops={vs} alpha={va}: real {np.round(out.scores, 4).tolist()} "
              f"generated {out.stats['generated_tokens']} wall {out.stats['wall_s']:.1f}s; replay "
              f"{np.round(r['score'], 4).tolist()} generated {r['generated_tokens']} est "
              f"{r.get('est_s', float('nan')):.1f}s; equal: {check}")
        res["verify"] = dict(n_init=vn, stops=vs, alpha=va, check=check, real_wall_s=out.stats["wall_s"],
                             real_generated_tokens=out.stats["generated_tokens"], est_s=r.get("est_s"),
                             real_scores=np.asarray(out.scores).tolist(), replay_scores=r["score"])
        if not all(check.values()):
            print("VERIFY FAILED")
    from rss_jax.report import write_json
    write_json(a.out, res)  # atomic: temporary file, then rename
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
