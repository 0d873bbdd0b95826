"""`rss-jax` command line: demo, generate, convert, train."""
from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_PROMPTS = ["Give me three tips for a good night's sleep.", "Write a short note to a friend who moved away.",
                "Describe a walk by the river in a few sentences."]
DEMO_DRAFT_LAYERS = [0, 1, 2, 3, 28, 29]


def _stats_row(name, out):
    s = out.stats
    return {"method": name, "new tokens": s["new_tokens"], "wall s": s["wall_s"], "tokens/s": s["tokens_per_s"],
            "compile s": s["compile_s"], "target calls": s.get("target_calls"),
            "tokens/target call": s.get("tokens_per_target_call", 1.0 if name == "ar" else None),
            "acceptance": s.get("acceptance_rate"), "alpha_hat": s.get("alpha_hat")}


def draft_cache() -> str:
    """Where `make drafts` keeps the trained drafts of the built-in model."""
    from rss_jax.loading import cache_root
    return os.path.join(cache_root() or os.path.expanduser("~/.cache/rss_jax"), "drafts")


def demo_drafts(lm, args):
    """(aligned draft, SFT draft, description): the given ones, else the feature-draft heads shipped with the
    package for the built-in model, else the separate-model drafts of `make drafts`, else untrained layer-truncated
    copies of the model."""
    import rss_jax as rj
    from training import make_draft
    if args.draft:
        draft = rj.load(args.draft)
        return draft, rj.load(args.sft) if args.sft else draft, "given drafts"
    if args.model == "smollm2-135m-instruct":
        try:
            sft = rj.load("smollm2-135m-instruct-head-sft")
            aligned = rj.load("smollm2-135m-instruct-head-aligned")
            return aligned, sft, ("shipped feature-draft heads: SFT (distilled toward the target) and aligned (DPO on "
                                  "VADER preferences)")
        except FileNotFoundError:
            pass
    distilled = os.path.join(draft_cache(), "smollm2-135m-instruct-distilled")
    aligned = os.path.join(draft_cache(), "smollm2-135m-instruct-aligned")
    if args.model == "smollm2-135m-instruct" and os.path.isdir(distilled):
        sft = rj.load(distilled)
        if os.path.isdir(aligned):
            return rj.load(aligned), sft, "trained drafts: distilled (SFT) and DPO-aligned on VADER preferences"
        return sft, sft, "distilled draft (no aligned draft yet: SSS then samples the target exactly)"
    draft = make_draft(lm, DEMO_DRAFT_LAYERS)
    return draft, draft, ("untrained layer-truncated draft (no trained drafts found; `make drafts` re-makes the "
                          "shipped heads); with sft = draft SSS samples the target exactly")


def cmd_demo(args) -> int:
    """Each method on each prompt at batch 1 (the latency a user waits for; compile time apart), then the texts and
    one table: speed, speed-up over plain decoding, acceptance, VADER."""
    import numpy as np

    import rss_jax as rj
    from rss_jax.decoding.speculative import pooled_stats
    from rss_jax.report import table

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    lm = rj.load(args.model)
    draft, sft, what = demo_drafts(lm, args)
    print(f"target: {lm}\ndraft:  {draft}\nsft:    {sft}\n({what}; loaded in {time.perf_counter() - t0:.1f} s)")
    reward = rj.rewards.vader_reward(lm.tokenizer) if lm.tokenizer is not None else None
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    runs = [("ar", {}), ("sd", dict(draft=sft, k=args.k)), ("eft", dict(draft=draft, sft=sft)),
            ("sss", dict(draft=draft, sft=sft, k=args.k))]
    rows, texts = [], {}
    for name, kw in runs:
        print(f"running {name} ...", flush=True)
        outs = [rj.generate(lm, [p], method=name, **kw, **common) for p in DEMO_PROMPTS]
        wall = sum(o.stats["wall_s"] for o in outs)
        new = sum(o.stats["new_tokens"] for o in outs)
        row = {"method": name, "new tokens": new, "wall s": wall, "tokens/s": new / wall,
               "compile s": sum(o.stats["compile_s"] for o in outs)}
        if name in ("sd", "sss"):
            pooled = pooled_stats(outs)
            row.update({"acceptance": pooled["acceptance_rate"], "alpha_hat": pooled["alpha_hat"],
                        "tokens/target call": pooled["tokens_per_block"]})
        if reward is not None:
            row["VADER"] = float(np.mean([reward.score(o.prompt_ids, [o.tokens[0][:o.lengths[0]].tolist()])[0]
                                          for o in outs]))
        rows.append(row)
        texts[name] = [o.texts[0] if o.texts else str(o.tokens[0]) for o in outs]
    base = rows[0]["tokens/s"]
    for r in rows:
        r["vs ar"] = r["tokens/s"] / base
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n=== prompt: {prompt}")
        for name, _ in runs:
            print(f"--- {name}:\n{texts[name][i].strip()}")
    print()
    cols = ["method", "new tokens", "wall s", "tokens/s", "vs ar", "acceptance", "alpha_hat", "tokens/target call",
            "VADER", "compile s"]
    print(table(rows, cols, title=f"batch 1 per prompt, {len(DEMO_PROMPTS)} prompts, {args.max_new_tokens} new "
                            f"tokens, T={args.temperature}, K={args.k}; sd drafts with the SFT draft and samples the "
                            "target; eft and sss sample the same aligned law"))
    return 0


def cmd_generate(args) -> int:
    import rss_jax as rj
    from rss_jax.report import table
    lm = rj.load(args.model, dtype=args.dtype)
    draft = rj.load(args.draft, dtype=args.dtype) if args.draft else None
    sft = rj.load(args.sft, dtype=args.dtype) if args.sft else None
    out = rj.generate(lm, args.prompt, method=args.method, draft=draft, sft=sft, k=args.k, mode=args.mode,
                      shift=args.shift, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed, chat=not args.no_chat)
    for prompt, text in zip(args.prompt, out.texts or [str(t) for t in out.tokens]):
        print(f"=== {prompt}\n{text}\n")
    print(table([_stats_row(args.method, out)]))
    return 0


def cmd_convert(args) -> int:
    import rss_jax as rj
    lm = rj.load(args.source)
    path = lm.save(args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rss-jax", description="Reward-shifted speculative sampling in JAX")
    sub = p.add_subparsers(dest="command", metavar="{demo,generate,convert,train}")
    sub.required = True

    d = sub.add_parser("demo", help="AR vs SD vs SSS on the built-in SmolLM2-135M-Instruct")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--draft", default=None, help="aligned draft, a head or a model (default: the shipped aligned "
                   "feature-draft head of the built-in model)")
    d.add_argument("--sft", default=None, help="SFT draft (default: the shipped SFT head; with --draft: the draft)")
    d.add_argument("--k", type=int, default=3, help="draft tokens per block (3: the fastest SSS K of scripts/bench_speculative.py)")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="generate with any method")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--method", default="ar", choices=("ar", "sd", "sss", "eft"))
    g.add_argument("--draft")
    g.add_argument("--sft")
    g.add_argument("--mode", default="exact", choices=("exact", "paper", "authors_code"))
    g.add_argument("--k", type=int, default=4)
    g.add_argument("--shift", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint (HF folder, GGUF, built-in) to an rss_jax Orbax folder")
    c.add_argument("source")
    c.add_argument("output")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    from training.cli import add_train_parser, run_train
    add_train_parser(sub).set_defaults(fn=run_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"rss-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
