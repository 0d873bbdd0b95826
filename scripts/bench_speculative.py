"""Speculative decoding on the real SmolLM2-135M-Instruct: AR, SD, EFT and SSS with the shipped feature-draft heads
(and with the separate-model v2 drafts when they are present), measured in one run.

    .venv/bin/python scripts/bench_speculative.py                    # the shipped heads; v2 drafts from the cache
    .venv/bin/python scripts/bench_speculative.py --quality-prompts 100 --k 2 3 4 6
    .venv/bin/python scripts/bench_speculative.py --costs-only --k 1 2 3 4 5   # the step costs alone (~2 min)
    .venv/bin/python scripts/bench_speculative.py --no-v2 --compare-heads SFT_DIR ALIGNED_DIR  # two head pairs
    .venv/bin/python scripts/bench_speculative.py --no-v2 --int8-heads --compare-heads \
        rss_jax/assets/heads/smollm2-135m-instruct-sft rss_jax/assets/heads/smollm2-135m-instruct-aligned  # int8 heads

Two parts, both batch 1 (each prompt alone: the latency a user waits for), float32, T = 0.8, no EOS stop (every run
makes exactly --new-tokens tokens), held-out prompts (data/prompts_eval.jsonl: topics the heads never saw):
1. K sweep on --sweep-prompts prompts: SD (SFT head) and SSS exact (aligned + SFT heads) for every K, EFT with the
   heads, and the same with the v2 drafts. Per-offset acceptance alpha_i, tokens per target call, tokens/s, speed-up
   over AR and over EFT, and the cost model's prediction.
2. Quality on --quality-prompts prompts at --quality-k: AR, SD, EFT and SSS; mean VADER with its standard error,
   and tokens/s over all of them. The four run on every prompt in a rotating order (interleaved calls), so this
   table's speed ratios do not carry the machine's drift over the run; the sweep runs each row over all its prompts
   in turn (its ratios do).

Cost model. c = one head drafting step (1-token head forward + logits over D) / one target step; v_K = one target
forward over K+1 tokens / one target step; r_K = one (K+1)-token head re-run with logits over D / one target step,
r'_K the same without logits (each timed alone, jitted, cached, batch 1). Tokens per block E = (1 - a^(K+1)) /
(1 - a) with a = alpha_hat. Predicted speed-up over AR: SD E / (v_K + K c + r'_K); SSS E / (v_K + K c + r_K +
r'_K) and EFT 1 / (1 + r_0 + r'_0) when the two heads share their draft vocabulary (the engine then scores both
re-runs in one product over W[D], which costs about what one does), else with 2 r_K and 2 r_0.
Writes results/bench_speculative.json and prints the tables.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def eval_prompts(n: int) -> list[str]:
    with open(os.path.join(ROOT, "data", "prompts_eval.jsonl")) as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return rows[:n]


def step_costs(lm, head, ks, repeats=10, rounds=4):
    """Times (ms) of: one target step, a target forward over K+1 tokens, one head drafting step, one (K+1)-token
    head re-run (all cached, batch 1, jitted, after warm-up; `rounds` alternated rounds of `repeats` calls each, the
    best round kept). The modules are merged with `decode_model`, as the decode loops merge them (per-layer weights,
    the CPU kernels), so the costs are the loops' own."""
    import jax
    import jax.numpy as jnp

    from rss_jax import kernels
    from rss_jax.cache import init_cache
    from rss_jax.decoding.common import compiler_options
    from rss_jax.models.base import decode_model
    cap, start = 256, 48
    tgt = lm.module
    hm = head.module
    emb = tgt.token_embeddings()
    rows = jnp.take(tgt.output_matrix(), jnp.asarray(head.config.token_ids), axis=0)
    if hm.is_int8:  # as the decode loop streams an int8 head's W[D]
        rows = kernels.quantize_rows(rows)
    taps = tuple(head.config.taps)

    @jax.jit
    def target_fwd(state, tokens, cache):
        m = decode_model(lm.graphdef, state)
        logits, cache, t = m(tokens, cache=cache, lengths=jnp.full((1,), start, jnp.int32), taps=taps)
        return logits, t

    @functools.partial(jax.jit, static_argnums=4)
    def head_fwd(state, feat, tokens, cache, with_logits):
        m = decode_model(head.graphdef, state)
        out = m(feat, tokens, emb, rows if with_logits else None, cache=cache, lengths=jnp.full((1,), start, jnp.int32))
        return out[0] if with_logits else out[1]

    calls = {}

    def add(name, fn, *a):
        # compiled with the decode loops' own compiler options
        fn = jax.jit(fn).lower(*a).compile(compiler_options=compiler_options())
        jax.block_until_ready(fn(*a))
        calls[name] = (fn, a)

    tc = init_cache(lm.config, 1, cap)
    hc = init_cache(head.config, 1, cap)
    e = lm.config.hidden_size
    add("target_1", target_fwd, lm.state, jnp.zeros((1, 1), jnp.int32), tc)
    add("head_step", lambda s, f, t, c: head_fwd(s, f, t, c, True), head.state, jnp.zeros((1, 1, e)),
        jnp.zeros((1, 1), jnp.int32), hc)
    for k in sorted(set(ks) | {0}):
        add(f"target_{k + 1}", target_fwd, lm.state, jnp.zeros((1, k + 1), jnp.int32), tc)
        for logits in (True, False):
            add(f"rerun_{k + 1}{'' if logits else '_nologits'}",
                lambda s, f, t, c, lg=logits: head_fwd(s, f, t, c, lg), head.state, jnp.zeros((1, k + 1, e)),
                jnp.zeros((1, k + 1), jnp.int32), hc)
    # rounds over all the calls in turn, best round per call: timing each call's rounds back to back let the
    # machine's drift decide the order of the block sizes (a 4-token forward once timed above a 5-token one)
    best = {name: math.inf for name in calls}
    for _ in range(rounds):
        for name, (fn, a) in calls.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                r = fn(*a)
            jax.block_until_ready(r)
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
    return {name: t * 1e3 for name, t in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-head", default="smollm2-135m-instruct-head-sft")
    ap.add_argument("--aligned-head", default="smollm2-135m-instruct-head-aligned")
    ap.add_argument("--v2-draft", default=None, help="aligned v2 draft folder (default: `make drafts`' cache)")
    ap.add_argument("--v2-sft", default=None, help="distilled v2 draft folder (default: `make drafts`' cache)")
    ap.add_argument("--no-v2", action="store_true", help="leave the v2 drafts' rows out even when they are cached")
    ap.add_argument("--compare-heads", nargs=2, default=None, metavar=("SFT", "ALIGNED"),
                    help="a second pair of heads (e.g. deeper ones) measured beside the first in the K sweep, rows "
                    "labelled 'heads B'; the quality part uses the first pair")
    ap.add_argument("--int8-heads", action="store_true", help="load --sft-head and --aligned-head with "
                    "quantize='int8' (int8 matrices and output rows W[D]; the target stays float32); give the float32 "
                    "heads as --compare-heads to time both in one run")
    ap.add_argument("--k", type=int, nargs="*", default=[2, 3, 4, 6])
    ap.add_argument("--sweep-prompts", type=int, default=6)
    ap.add_argument("--quality-prompts", type=int, default=100, help="0 skips the quality part")
    ap.add_argument("--quality-k", type=int, default=None, help="K of the quality part (default: the sweep's "
                    "fastest SSS K)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--draft-top-k", type=int, default=None)
    ap.add_argument("--draft-temperature", type=float, nargs="+", default=[None],
                    help="proposal temperature(s) of SD and SSS exact with the heads (default: --temperature); "
                    "the sweep runs each, the quality part the first")
    ap.add_argument("--int8", action="store_true", help="also run AR, EFT, SD and SSS of the sweep with the target "
                    "and the heads loaded with quantize='int8' (rows marked int8; 'vs ar' is against float32 AR)")
    ap.add_argument("--costs-only", action="store_true", help="time the step costs (for K in --k) and stop")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_speculative.json"))
    args = ap.parse_args()

    import numpy as np

    import rss_jax as rj
    from rss_jax.cli import draft_cache
    from rss_jax.decoding.speculative import pooled_stats
    from rss_jax.report import interleaved, machine, table, write_json

    t_start = time.time()
    lm = rj.load("smollm2-135m-instruct")
    head_q = "int8" if args.int8_heads else None
    sft, aligned = rj.load(args.sft_head, quantize=head_q), rj.load(args.aligned_head, quantize=head_q)
    v2 = None
    v2d = args.v2_draft or os.path.join(draft_cache(), "smollm2-135m-instruct-aligned")
    v2s = args.v2_sft or os.path.join(draft_cache(), "smollm2-135m-instruct-distilled")
    pairs = [("heads", sft, aligned)]
    if args.compare_heads:
        pairs.append(("heads B", rj.load(args.compare_heads[0]), rj.load(args.compare_heads[1])))
    if args.no_v2:
        pass
    elif os.path.isdir(v2d) and os.path.isdir(v2s):
        v2 = (rj.load(v2d), rj.load(v2s))
    else:
        print(f"v2 drafts not found ({v2s}, {v2d}); `make drafts-v2` re-makes them (about 90 min); their rows are "
              "left out", flush=True)
    reward = rj.rewards.vader_reward(lm.tokenizer)
    common = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, eos=[])

    def run(prompts, method, seed0=0, target=None, **kw):
        """Each prompt alone (batch 1) after one compile call; stats summed over prompts."""
        target = target or lm
        rj.generate(target, prompts[:1], method=method, seed=seed0, **kw, **common)  # compile
        outs = [rj.generate(target, [p], method=method, seed=seed0 + i, **kw, **common)
                for i, p in enumerate(prompts)]
        return summarize(outs)

    def run_interleaved(prompts, configs, seed0=0):
        """configs: (method, kwargs) pairs, each run on every prompt (prompt i with seed seed0 + i, as `run` does, so
        the same tokens) in a rotating order, so that the machine's drift over the run hits every config alike and
        their speed ratios compare. -> one result per config, as `run` gives."""
        for method, kw in configs:  # compile
            rj.generate(lm, prompts[:1], method=method, seed=seed0, **kw, **common)
        outs = interleaved(prompts, configs, lambda config, i, p: rj.generate(
            lm, [p], method=config[0], seed=seed0 + i, **config[1], **common))
        return [summarize(o) for o in outs]

    def summarize(outs):
        wall = sum(o.stats["wall_s"] for o in outs)
        new = sum(o.stats["new_tokens"] for o in outs)
        vader = [float(reward.score(o.prompt_ids, [o.tokens[0][:o.lengths[0]].tolist()])[0]) for o in outs]
        res = {"tok/s": new / wall, "wall s": wall, "tokens": new, "VADER": float(np.mean(vader)),
               "VADER se": float(np.std(vader, ddof=1) / math.sqrt(len(vader))) if len(vader) > 1 else None,
               "vader_all": vader}
        if "accepted_histogram" in outs[0].stats and outs[0].stats["k"]:
            pooled = pooled_stats(outs)
            res.update({"proposal T": outs[0].stats.get("draft_temperature"),  # a calibrated head's, or the asked one
                        "alpha_hat": pooled["alpha_hat"], "acceptance": pooled["acceptance_rate"],
                        "alpha_i": [round(x, 3) for x in pooled["acceptance_by_offset"]],
                        "tokens/target call": pooled["tokens_per_block"]})
        return res

    costs = step_costs(lm, sft, args.k)
    t1 = costs["target_1"]
    c = costs["head_step"] / t1
    print(f"step costs (ms): {json.dumps({k: round(v, 2) for k, v in costs.items()})}; c = {c:.3f}", flush=True)
    pair_costs = {"heads": costs}
    for label, p_sft, _ in pairs[1:]:
        pair_costs[label] = step_costs(lm, p_sft, args.k)
        print(f"{label} step costs (ms): {json.dumps({k: round(v, 2) for k, v in pair_costs[label].items()})}; "
              f"c = {pair_costs[label]['head_step'] / pair_costs[label]['target_1']:.3f}", flush=True)
    if args.costs_only:
        rows = [{"forward": f"target, {k + 1} tokens", "ms": costs[f"target_{k + 1}"],
                 "vs target step": costs[f"target_{k + 1}"] / t1} for k in sorted(set(args.k) | {0})]
        rows.append({"forward": "head drafting step", "ms": costs["head_step"], "vs target step": c})
        print(table(rows, title=f"step costs, batch 1, float32; {machine()}"))
        write_json(args.out, {"machine": machine(), "command": " ".join(sys.argv), "sft_head": sft.source,
                              "step_costs_ms": costs, "c": c, "total_s": time.time() - t_start})
        return

    # a head pair over one draft vocabulary: the engine scores both re-runs with one product over W[D]
    shared = {label: tuple(p_sft.config.token_ids) == tuple(p_aligned.config.token_ids)
              for label, p_sft, p_aligned in pairs}

    def rerun_pair(pc, n, one_product):
        """ms of the two heads' n-token re-runs with logits: one product (about one re-run with logits and one
        without) or two."""
        return pc[f"rerun_{n}"] + pc[f"rerun_{n}_nologits"] if one_product else 2 * pc[f"rerun_{n}"]

    def predict(method, k, a, label="heads"):
        pc = pair_costs[label]
        u = pc["target_1"]
        e_tok = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        vk, ck = pc[f"target_{k + 1}"] / u, pc["head_step"] / u
        if method == "sd":
            return e_tok / (vk + k * ck + pc[f"rerun_{k + 1}_nologits"] / u)
        return e_tok / (vk + k * ck + rerun_pair(pc, k + 1, shared[label]) / u)

    prompts = eval_prompts(max(args.sweep_prompts, args.quality_prompts))
    sweep = prompts[:args.sweep_prompts]
    rows = []
    ar = run(sweep, "ar")
    rows.append(dict(method="ar", draft="-", K=None, **ar, **{"vs ar": 1.0}))
    efts = {}
    for label, p_sft, p_aligned in pairs:
        efts[label] = run(sweep, "eft", draft=p_aligned, sft=p_sft)
        pc = pair_costs[label]
        rows.append(dict(method="eft", draft=label, K=None, **efts[label],
                         **{"vs ar": efts[label]["tok/s"] / ar["tok/s"],
                            "predicted vs ar": 1.0 / (1 + rerun_pair(pc, 1, shared[label]) / pc["target_1"])}))
    eft = efts["heads"]
    if v2 is not None:
        eft2 = run(sweep, "eft", draft=v2[0], sft=v2[1])
        rows.append(dict(method="eft", draft="v2", K=None, **eft2, **{"vs ar": eft2["tok/s"] / ar["tok/s"]}))
    dts = args.draft_temperature
    for k in args.k:
        for method in ("sd", "sss"):
            for (label, p_sft, p_aligned), dt in ((pair, dt) for pair in pairs for dt in dts):
                kw = dict(draft=p_sft, k=k) if method == "sd" else dict(draft=p_aligned, sft=p_sft, k=k)
                r = run(sweep, method, draft_top_k=args.draft_top_k, draft_temperature=dt, **kw)
                row = dict(method=method, draft=label, K=k, **r,
                           **{"vs ar": r["tok/s"] / ar["tok/s"],
                              "predicted vs ar": predict(method, k, r["alpha_hat"], label)})
                if dt is not None:
                    row["draft T"] = dt
                if method == "sss":
                    row["vs eft"] = r["tok/s"] / efts[label]["tok/s"]
                rows.append(row)
            if v2 is not None:
                kw2 = dict(draft=v2[1], k=k) if method == "sd" else dict(draft=v2[0], sft=v2[1], k=k)
                r2 = run(sweep, method, draft_top_k=args.draft_top_k, **kw2)
                row2 = dict(method=method, draft="v2", K=k, **r2, **{"vs ar": r2["tok/s"] / ar["tok/s"]})
                if method == "sss":
                    row2["vs eft"] = r2["tok/s"] / eft2["tok/s"]
                rows.append(row2)
        print(table([{k2: v for k2, v in r.items() if k2 not in ("vader_all", "alpha_i")}
                     for r in rows[-2 * (len(pairs) * len(dts) + (v2 is not None)):]]), flush=True)
    for r in rows:
        r["weights"] = "float32"
    if args.int8:  # the same sweep with int8 weights (target and heads), against the float32 rows above
        lm8 = rj.load("smollm2-135m-instruct", quantize="int8")
        sft8, aligned8 = rj.load(args.sft_head, quantize="int8"), rj.load(args.aligned_head, quantize="int8")
        ar8 = run(sweep, "ar", target=lm8)
        eft8 = run(sweep, "eft", target=lm8, draft=aligned8, sft=sft8)
        rows.append(dict(method="ar", draft="-", K=None, weights="int8", **ar8,
                         **{"vs ar": ar8["tok/s"] / ar["tok/s"], "vs ar int8": 1.0}))
        rows.append(dict(method="eft", draft="heads", K=None, weights="int8", **eft8,
                         **{"vs ar": eft8["tok/s"] / ar["tok/s"], "vs ar int8": eft8["tok/s"] / ar8["tok/s"]}))
        for k in args.k:
            for method in ("sd", "sss"):
                kw = dict(draft=sft8, k=k) if method == "sd" else dict(draft=aligned8, sft=sft8, k=k)
                r = run(sweep, method, target=lm8, draft_top_k=args.draft_top_k, draft_temperature=dts[0], **kw)
                row = dict(method=method, draft="heads", K=k, weights="int8", **r,
                           **{"vs ar": r["tok/s"] / ar["tok/s"], "vs ar int8": r["tok/s"] / ar8["tok/s"]})
                if dts[0] is not None:
                    row["draft T"] = dts[0]
                if method == "sss":
                    row["vs eft"] = r["tok/s"] / eft8["tok/s"]
                rows.append(row)
            print(table([{k2: v for k2, v in r.items() if k2 not in ("vader_all", "alpha_i")} for r in rows[-2:]]),
                  flush=True)
    head_weights = {"heads": head_q or "float32", "heads B": "float32"}
    for r in rows:
        if r["draft"] in head_weights:
            r["head weights"] = head_weights[r["draft"]]
    cols = ["method", "draft", "head weights", "proposal T", "weights", "K", "tok/s", "vs ar", "vs ar int8",
            "predicted vs ar", "vs eft", "alpha_hat", "alpha_i", "tokens/target call", "VADER"]
    c_all = "; ".join(f"{label} c = {pc['head_step'] / pc['target_1']:.3f}" for label, pc in pair_costs.items())
    title = (f"K sweep: batch 1, {len(sweep)} held-out prompts, {args.new_tokens} new tokens, T={args.temperature}, "
             f"no EOS stop, float32 (and int8 rows with --int8); {c_all}; {machine()}")
    print()
    print(table([{k2: (str(v) if k2 == "alpha_i" else v) for k2, v in r.items()} for r in rows], cols, title=title))

    if args.quality_prompts <= 0:
        for r in rows:
            r.pop("vader_all", None)
        write_json(args.out, {"machine": machine(), "command": " ".join(sys.argv), "sft_head": sft.source,
                              "aligned_head": aligned.source, "v2": [m.source for m in v2] if v2 else None,
                              "compare_heads": [m.source for m in pairs[1][1:]] if len(pairs) > 1 else None,
                              "step_costs_ms": costs, "compare_step_costs_ms": pair_costs.get("heads B"), "c": c,
                              "sweep": rows, "total_s": time.time() - t_start})
        return
    # quality: the fastest SSS K of the sweep unless given
    first = [r for r in rows if r["draft"] == "heads" and r["weights"] == "float32" and r.get("draft T") == dts[0]]
    sss_rows = [r for r in first if r["method"] == "sss"]
    qk = args.quality_k or max(sss_rows, key=lambda r: r["tok/s"])["K"]
    sd_rows = [r for r in first if r["method"] == "sd"]
    qk_sd = max(sd_rows, key=lambda r: r["tok/s"])["K"]
    qp = prompts[:args.quality_prompts]
    quality = []
    # the four methods interleaved per prompt: the headline ratios of this table come from alternated calls
    q_ar, q_sd, q_eft, q_sss = run_interleaved(qp, [
        ("ar", {}),
        ("sd", dict(draft=sft, k=qk_sd, draft_top_k=args.draft_top_k, draft_temperature=dts[0])),
        ("eft", dict(draft=aligned, sft=sft)),
        ("sss", dict(draft=aligned, sft=sft, k=qk, draft_top_k=args.draft_top_k, draft_temperature=dts[0]))],
        seed0=1000)
    quality.append(dict(method="ar", K=None, **q_ar, **{"vs ar": 1.0}))
    quality.append(dict(method="sd", K=qk_sd, **q_sd, **{"vs ar": q_sd["tok/s"] / q_ar["tok/s"]}))
    if dts[0] is not None:
        quality[-1]["draft T"] = dts[0]
    quality.append(dict(method="eft", K=None, **q_eft, **{"vs ar": q_eft["tok/s"] / q_ar["tok/s"]}))
    quality.append(dict(method="sss", K=qk, **q_sss, **{"vs ar": q_sss["tok/s"] / q_ar["tok/s"],
                                                        "vs eft": q_sss["tok/s"] / q_eft["tok/s"]}))
    if dts[0] is not None:
        quality[-1]["draft T"] = dts[0]
    gap = q_sss["VADER"] - q_ar["VADER"]
    gap_se = math.sqrt(q_sss["VADER se"] ** 2 + q_ar["VADER se"] ** 2)
    for r in quality:
        if r["method"] != "ar":
            r["head weights"] = head_weights["heads"]
    qcols = ["method", "K", "head weights", "proposal T", "tok/s", "vs ar", "vs eft", "alpha_hat", "alpha_i",
             "tokens/target call", "VADER", "VADER se"]
    qtitle = (f"quality: batch 1, {len(qp)} held-out prompts, {args.new_tokens} new tokens, T={args.temperature}, "
              f"no EOS stop; SSS - AR VADER = {gap:.3f} ({gap / gap_se:.1f} standard errors)")
    print()
    print(table([{k2: (str(v) if k2 == "alpha_i" else v) for k2, v in r.items()} for r in quality], qcols,
                title=qtitle))
    for r in rows + quality:
        r.pop("vader_all", None)
    write_json(args.out, {"machine": machine(), "command": " ".join(sys.argv), "sft_head": sft.source,
                          "aligned_head": aligned.source, "v2": [m.source for m in v2] if v2 else None,
                          "compare_heads": [m.source for m in pairs[1][1:]] if len(pairs) > 1 else None,
                          "step_costs_ms": costs, "compare_step_costs_ms": pair_costs.get("heads B"), "c": c,
                          "sweep": rows, "quality": quality,
                          "vader_gap": gap, "vader_gap_se": gap_se, "total_s": time.time() - t_start})


if __name__ == "__main__":
    main()
