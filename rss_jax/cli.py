"""`rss-jax` command line: demo, generate, convert, train."""
from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_PROMPTS = ["Give me three tips for a good night's sleep.", "Write a short, kind note to a friend who is sad."]
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
    """(aligned draft, SFT draft, description): the given ones, else the best the cache has, else untrained
    layer-truncated copies of the model."""
    import rss_jax as rj
    from training import make_draft
    if args.draft:
        draft = rj.load(args.draft)
        return draft, rj.load(args.sft) if args.sft else draft, "given drafts"
    distilled = os.path.join(draft_cache(), "smollm2-135m-instruct-distilled")
    aligned = os.path.join(draft_cache(), "smollm2-135m-instruct-aligned")
    if args.model == "smollm2-135m-instruct" and os.path.isdir(distilled):
        sft = rj.load(distilled)
        if os.path.isdir(aligned):
            return rj.load(aligned), sft, "trained drafts: distilled (SFT) and DPO-aligned on VADER preferences"
        return sft, sft, "distilled draft (no aligned draft yet: SSS then samples the target exactly)"
    draft = make_draft(lm, DEMO_DRAFT_LAYERS)
    return draft, draft, ("untrained layer-truncated draft: run `make drafts` to distil and align one (about 30 "
                          "minutes on two cores); with sft = draft SSS samples the target exactly")


def cmd_demo(args) -> int:
    import rss_jax as rj
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
        out = rj.generate(lm, DEMO_PROMPTS, method=name, **kw, **common)
        row = _stats_row(name, out)
        if reward is not None:
            resp = [r[:n].tolist() for r, n in zip(out.tokens, out.lengths)]
            row["VADER"] = float(reward.score(out.prompt_ids, resp).mean())
        rows.append(row)
        texts[name] = out.texts
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n=== prompt: {prompt}")
        for name, _ in runs:
            print(f"--- {name}:\n{texts[name][i].strip()}")
    print()
    print(table(rows, title=f"batch {len(DEMO_PROMPTS)}, {args.max_new_tokens} new tokens, T={args.temperature}, "
                            f"K={args.k}; sd drafts with the SFT draft, eft and sss target the same distribution"))
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
    d.add_argument("--draft", default=None, help="aligned draft (default: a layer-truncated copy of the model)")
    d.add_argument("--sft", default=None, help="SFT draft (default: the draft itself)")
    d.add_argument("--k", type=int, default=4)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.7)
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
