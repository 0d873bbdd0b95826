"""The `rss-jax` command line: generate, info, demo, convert, train, bench.

Every expected failure prints one line, `rss-jax: error: <problem>; <fix>`, on stderr and exits with status 2;
`--debug` (anywhere on the line) shows the traceback instead. `rss-jax COMMAND --help` ends with an example.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

DEMO_PROMPTS = ["Give me three tips for a good night's sleep.", "Write a short note to a friend who moved away.",
                "Describe a walk by the river in a few sentences."]
DEMO_DRAFT_LAYERS = [0, 1, 2, 3, 28, 29]
BUILTIN_MODEL = "smollm2-135m-instruct"
BENCHES = {"decode": "bench_decode.py", "speculative": "bench_speculative.py", "search": "bench_search.py",
           "train": "bench_train.py"}


class CLIError(Exception):
    """An expected failure: `problem` and what the user can do about it (`fix`)."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem, self.fix = problem, fix

    def line(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`rss-jax: error: ...; see ... --help`) instead of usage + message."""

    def error(self, message):
        one_line(f"{message}; see `{self.prog} --help`")
        sys.exit(2)


def one_line(msg: str) -> None:
    print("rss-jax: error: " + " ".join(str(msg).split()), file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------------
# argument types: numbers are checked here, so `--temperature -1` fails before any model is loaded
# ------------------------------------------------------------------------------------------------------------------

def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or a finite float in [low, high] (open ends with low_open / high_open)."""
    what = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (v < low or (low_open and v == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (v > high or (high_open and v == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


POS_INT = number(int, 1)
NONNEG_INT = number(int, 0)
POS_FLOAT = number(float, 0, low_open=True)
NONNEG_FLOAT = number(float, 0)
FLOAT = number(float)


def int_list(text):
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,8,16, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 4,8,16, got {text!r}")
    return out


def mesh_spec(text):
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4} (checked against the devices when the mesh is built)."""
    from rss_jax.sharding import ShardingError, parse_mesh_sizes
    try:
        return parse_mesh_sizes(text)
    except ShardingError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_mesh(sizes):
    if not sizes:
        return None
    from rss_jax import sharding
    return sharding.make_mesh(**{"data": -1, **sizes})


# ------------------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------------------

def draft_cache() -> str:
    """Where `make drafts-v2` keeps the separate-model drafts of the built-in model."""
    from rss_jax.loading import cache_root
    return os.path.join(cache_root() or os.path.expanduser("~/.cache/rss_jax"), "drafts")


def demo_drafts(lm, args):
    """(aligned draft, SFT draft, description): the given ones, else the feature-draft heads shipped with the
    package for the built-in model, else the separate-model drafts of `make drafts-v2`, else untrained
    layer-truncated copies of the model."""
    import rss_jax as rj
    from training import make_draft
    if args.draft:
        draft = rj.load(args.draft)
        return draft, rj.load(args.sft) if args.sft else draft, "given drafts"
    if args.model == BUILTIN_MODEL:
        q = None if args.head_weights == "float32" else args.head_weights
        try:
            sft = rj.load("smollm2-135m-instruct-head-sft", quantize=q)
            aligned = rj.load("smollm2-135m-instruct-head-aligned", quantize=q)
            return aligned, sft, (f"shipped feature-draft heads, {args.head_weights} weights: SFT (distilled toward "
                                  "the target) and aligned (DPO on VADER preferences)")
        except FileNotFoundError:
            pass
    distilled = os.path.join(draft_cache(), "smollm2-135m-instruct-distilled")
    aligned = os.path.join(draft_cache(), "smollm2-135m-instruct-aligned")
    if args.model == BUILTIN_MODEL and os.path.isdir(distilled):
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
                        "tokens/target call": pooled["tokens_per_block"],
                        "proposal T": outs[0].stats["draft_temperature"]})
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
    cols = ["method", "new tokens", "wall s", "tokens/s", "vs ar", "proposal T", "acceptance", "alpha_hat",
            "tokens/target call", "VADER", "compile s"]
    print(table(rows, cols, title=f"batch 1 per prompt, {len(DEMO_PROMPTS)} prompts, {args.max_new_tokens} new "
                            f"tokens, T={args.temperature}, K={args.k}; sd drafts with the SFT draft and samples the "
                            "target; eft and sss sample the same aligned law"))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# convert, info, bench
# ------------------------------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    import rss_jax as rj
    if os.path.exists(args.output) and not args.overwrite:
        raise CLIError(f"{args.output} exists", "pass --overwrite to replace it or choose another output folder")
    lm = rj.load(args.source)
    path = lm.save(args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def model_info(source: str) -> dict:
    """What `rss-jax info` prints, read from the checkpoint's description (no weights are loaded)."""
    from rss_jax import heads, loading
    from rss_jax.loading import gguf_io, load_tokenizer, orbax_io
    from rss_jax.loading.names import CheckpointError
    from rss_jax.models.config import read_hf_config
    from rss_jax.models.feature_head import num_params

    head_path = heads.resolve_builtin_head(source) or source
    if heads.is_head_folder(head_path):
        cfg, scale = heads.read_description(head_path)
        n = num_params(cfg)
        t = cfg.target
        target = (f"{t['model_type'] or t['family']} ({t['family']} family), {t['num_layers']} layers, hidden "
                  f"{t['hidden_size']}, vocabulary {t['vocab_size']}")
        if source in heads.BUILTIN_HEADS or os.path.abspath(head_path).startswith(os.path.abspath(heads.ASSETS)):
            target = f"{BUILTIN_MODEL}: {target}"
        return {"model": source, "path": os.path.abspath(head_path), "kind": "feature-draft head",
                "parameters": n, "target": target, "taps (target layers read)": list(cfg.taps),
                "decoder layers": cfg.depth,
                "proposal temperature": "the sampling temperature's" if scale is None else
                f"{scale:g} x the sampling temperature (calibrated)",
                "draft vocabulary": len(cfg.token_ids), "vocabulary": cfg.target_vocab_size,
                "chat template": "no (a head uses its target's tokenizer)",
                "memory float32": _size(4 * n), "memory bfloat16": _size(2 * n)}
    path = loading.resolve_builtin(source) if source in loading.BUILTIN else source
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (and not a built-in model name; built-ins: "
                                f"{', '.join(sorted(loading.BUILTIN))})")
    tokenizer = None
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path}: not a checkpoint rss_jax reads; expected a folder with config.json and "
                                  "safetensors, a .gguf file, an rss_jax Orbax folder or a feature-draft head folder")
        cache = loading.gguf_cache_dir(path)
        if cache is not None and orbax_io.is_orbax_folder(cache):
            config, tokenizer = orbax_io.read_config(cache), load_tokenizer(cache)
        else:
            config = gguf_io.gguf_config(gguf_io.open_gguf(path), path)
            tokenizer = load_tokenizer(gguf_file=path)
        kind = "GGUF file"
    elif orbax_io.is_orbax_folder(path):
        config, tokenizer, kind = orbax_io.read_config(path), load_tokenizer(path), "rss_jax Orbax folder"
    else:
        config, _ = read_hf_config(path)
        tokenizer, kind = load_tokenizer(path), "Hugging Face folder"
    targets = loading.flatten_targets(config)
    n = int(sum(math.prod(s.shape) for s in targets.values()))
    # --quantize int8: matrices at one byte plus a float32 scale per 32 weights; norms, biases, positions float32
    from rss_jax.models import gpt2, llama, opt
    quantised = {n for m in (llama.Llama, gpt2.GPT2, opt.OPT) for n in m.QUANT_LAYER_PARAMS}
    tables = {"embed_tokens", "wte", "lm_head", "head_rows"}
    matrices = sum(math.prod(s.shape) for k, s in targets.items()
                   if (k.startswith("layers.") and k.split(".")[-1] in quantised) or k in tables)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):  # several named templates
        template = template.get("default") or next(iter(template.values()), None)
    first = next((ln.strip() for ln in str(template).splitlines() if ln.strip()), "") if template else ""
    return {"model": source, "path": os.path.abspath(path), "kind": kind,
            "family": f"{config.model_type or config.family} ({config.family} family)", "parameters": n,
            "layers": config.num_layers, "hidden size": config.hidden_size,
            "vocabulary": len(tokenizer) if tokenizer is not None else config.vocab_size,
            "embedding rows": config.vocab_size, "context": config.max_position_embeddings,
            "tokenizer": "yes" if tokenizer is not None else "no (prompts must be token ids)",
            "chat template": f"yes: {first[:100]}" if template else "no",
            "memory float32": _size(4 * n), "memory bfloat16": _size(2 * n),
            "memory int8 (--quantize)": _size(int(matrices * (1 + 4 / 32) + 4 * (n - matrices)))}


def cmd_info(args) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f} M)"
        print(f"{k.ljust(width)}  {v}")
    return 0


def scripts_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def run_bench(name: str, rest: list) -> int:
    script = os.path.join(scripts_dir(), BENCHES[name])
    if not os.path.exists(script):
        raise CLIError(f"{script} is missing: the benchmarks live in the repository's scripts/ folder, which this "
                       "installation does not have", "run `rss-jax bench` from a source checkout of rss_jax")
    return subprocess.call([sys.executable, script, *rest])


def cmd_w2s(args) -> int:
    import dataclasses

    from rss_jax import w2s
    fields = {f.name for f in dataclasses.fields(w2s.Settings)}
    chosen = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings = w2s.Settings(**chosen)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    command = "rss-jax w2s " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["w2s"] else "rss-jax w2s"
    summary = w2s.run(settings, args.work, args.out, None if args.no_report else args.results, methods=methods,
                      v2=args.v2, command=command.strip())
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {args.results}") +
          f" ({len(summary['methods'])} methods, {summary['eval_prompts']} prompts)")
    return 0


def cmd_bench(args) -> int:
    return run_bench(args.name, args.rest)


# ------------------------------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------------------------------

EXAMPLES = {
    "generate": """input: JSON Lines, one object per line with "prompt" (text, chat template applied unless
--no-chat) or "prompt_ids" (token ids); other fields are copied to the output. Without --prompt and --input,
JSONL is read from stdin when it is not a terminal.
output (--output FILE.jsonl, or - for stdout): per row index, prompt, prompt_ids, text (null without a tokenizer),
token_ids, num_tokens, score (reward methods), the call's seed and prompt_offset, batch [start, stop) and the
method's statistics of that batch (timings only with --timing). The file appears when the run ends (written
under a temporary name, then renamed); an interrupted run keeps its finished batches in .NAME.partial beside it,
and --resume continues from there (or from a finished file, given a longer input). Batches are fixed by input
position (rows [0, B), [B, 2B), ...), so a resumed file equals an uninterrupted one.
rewards (--reward): vader (the default; needs a tokenizer), a reward-model folder (Hugging Face
...ForSequenceClassification, safetensors), or FILE.py:NAME / module:NAME, a function
f(prompt_ids, response_ids) -> one float per response (or a rss_jax.rewards.Reward).

examples:
  rss-jax generate --prompt "Write a haiku about rain." --method sss --max-new-tokens 64
  rss-jax generate --model DIR --method bon --n 8 --reward vader --input prompts.jsonl --output out.jsonl
  rss-jax generate --model DIR --method bon --n 8 --input prompts.jsonl --output out.jsonl --resume
  cat prompts.jsonl | rss-jax generate --model DIR --method sd --draft SMALL_DIR --output -""",
    "info": """example:
  rss-jax info smollm2-135m-instruct
  rss-jax info smollm2-135m-instruct-head-aligned --json""",
    "demo": """example:
  rss-jax demo --max-new-tokens 32 --k 3""",
    "convert": """example:
  rss-jax convert smollm2-135m-instruct converted/   # an Orbax folder: reloads without GGUF dequantisation""",
    "w2s": """examples:
  rss-jax w2s                                   # the whole evaluation (about 90 minutes on 2 CPU cores; resumable)
  rss-jax w2s --methods vanilla,sss_exact,eft   # some methods only
  rss-jax w2s --v2 make                         # re-make the separate-model v2 drafts first (90 more minutes)""",
    "bench": """benchmarks: decode (scripts/bench_decode.py), speculative (bench_speculative.py), search
(bench_search.py), train (bench_train.py); everything after the name goes to the script.

examples:
  rss-jax bench decode --batch 1 --dtype float32 --repeats 5
  rss-jax bench speculative --help                  # each benchmark's own options""",
    "train": """example:
  rss-jax train head-distill --data samples.jsonl --output runs/head --steps 450""",
    "train sft": """example:
  rss-jax train sft --policy DIR --data sft.jsonl --output runs/sft --steps 200""",
    "train distill": """example:
  rss-jax train distill --policy DRAFT --teacher smollm2-135m-instruct --data samples.jsonl --output kd --steps 200""",
    "train dpo": """example:
  rss-jax train dpo --policy DIR --data pairs.jsonl --output runs/dpo --steps 200 --batch-size 4 \\
      --learning-rate 5e-6""",
    "train head-distill": """example:
  rss-jax train head-distill --data samples.jsonl --output runs/head --steps 450""",
    "train head-dpo": """example:
  rss-jax train head-dpo --sft runs/head/final --data pairs.jsonl --output runs/head-dpo --steps 150""",
}


def _with_examples(p: argparse.ArgumentParser, key: str) -> argparse.ArgumentParser:
    p.epilog = EXAMPLES[key]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def build_parser() -> argparse.ArgumentParser:
    from rss_jax.cli_generate import add_generate_parser
    p = Parser(prog="rss-jax", description="Reward-shifted speculative sampling in JAX: generate with SSS and the "
               "methods it is measured\nagainst, inspect and convert checkpoints, train drafts, run benchmarks.",
               epilog="`rss-jax COMMAND --help` shows each command's options and an example. --debug (anywhere) "
               "shows\ntracebacks instead of one-line errors.\n\nexample:\n  rss-jax generate --prompt \"Hello\" "
               "--method sss",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = "{generate,info,demo,convert,train,bench,w2s}"
    sub = p.add_subparsers(dest="command", metavar=commands)
    sub.required = True

    add_generate_parser(sub, lambda q: _with_examples(q, "generate"))

    i = _with_examples(sub.add_parser("info", help="what a checkpoint holds: family, size, vocabulary, chat template",
                                      description="Describe a model or feature-draft head without loading its "
                                      "weights: family, parameter count, vocabulary, chat template, memory."), "info")
    i.add_argument("model", help="HF folder, .gguf file, rss_jax Orbax folder, head folder or built-in name")
    i.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    i.set_defaults(fn=cmd_info)

    d = _with_examples(sub.add_parser("demo", help="AR vs SD vs SSS on the built-in SmolLM2-135M-Instruct"), "demo")
    d.add_argument("--model", default=BUILTIN_MODEL)
    d.add_argument("--draft", default=None, help="aligned draft, a head or a model (default: the shipped aligned "
                   "feature-draft head of the built-in model)")
    d.add_argument("--sft", default=None, help="SFT draft (default: the shipped SFT head; with --draft: the draft)")
    d.add_argument("--head-weights", choices=["int8", "float32"], default="int8",
                   help="the shipped heads' weights: int8 (matrices and output rows at one byte plus a scale per 32; "
                   "a quarter of the bytes per drafting step) or float32; the target stays as loaded")
    d.add_argument("--k", type=POS_INT, default=3,
                   help="draft tokens per block (3: the fastest SSS K of scripts/bench_speculative.py)")
    d.add_argument("--max-new-tokens", type=POS_INT, default=64)
    d.add_argument("--temperature", type=NONNEG_FLOAT, default=0.8)
    d.add_argument("--seed", type=NONNEG_INT, default=0)
    d.set_defaults(fn=cmd_demo)

    c = _with_examples(sub.add_parser("convert", help="convert a checkpoint (HF folder, GGUF, built-in) to an "
                                      "rss_jax Orbax folder"), "convert")
    c.add_argument("source")
    c.add_argument("output")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert)

    from training.cli import add_train_parser, run_train
    t = _with_examples(add_train_parser(sub), "train")
    t.set_defaults(fn=run_train)
    for action in t._actions:  # the train modes' own parsers
        if isinstance(action, argparse._SubParsersAction):
            for mode, q in action.choices.items():
                if f"train {mode}" in EXAMPLES:
                    _with_examples(q, f"train {mode}")

    w = _with_examples(sub.add_parser("w2s", help="the weak-to-strong evaluation: every method on held-out prompts, "
                                      "JSON, table and plots", description="Run (or resume) the weak-to-strong "
                                      "evaluation of the built-in model: every method on held-out prompts, scored by "
                                      "VADER (gold), AFINN and TextBlob, with cost per token. Finished chunks under "
                                      "--work are reused."), "w2s")
    w.add_argument("--work", default="runs/w2s", help="folder of the cached per-chunk artifacts (default runs/w2s)")
    w.add_argument("--out", default="docs/results/weak_to_strong.json", help="the summary JSON")
    w.add_argument("--results", default="docs/RESULTS.md", help="the report (its plots go to results/ beside it)")
    w.add_argument("--no-report", action="store_true", help="write the JSON only")
    w.add_argument("--methods", default=None, help="comma-separated subset (vanilla, sd_sft, sd, sss_exact, "
                   "sss_paper, sss_authors_code, eft, args, cards, rs, treebon, gsi, rsd, bon_pool, spr_..., *_v2)")
    w.add_argument("--v2", choices=("auto", "make", "skip"), default="auto", help="the separate-model v2 drafts: "
                   "use them when cached (auto), re-make them when absent (make), or leave them out (skip)")
    w.add_argument("--eval-prompts", type=POS_INT, default=None, help="held-out prompts (default 100)")
    w.add_argument("--search-prompts", type=POS_INT, default=None, help="prompts for BoN(64), Speculative "
                   "Rejection, TreeBoN, GSI, RS and CARDS (default 20: the 90-minute budget on two cores)")
    w.add_argument("--latency-prompts", type=POS_INT, default=None, help="prompts run one at a time for the "
                   "wall-clock (default 4)")
    w.add_argument("--new-tokens", type=POS_INT, default=None, help="new tokens at most (default 128)")
    w.add_argument("--k", type=POS_INT, default=None, help="draft tokens per block for SD and SSS (default 3)")
    w.add_argument("--chunk", type=POS_INT, default=None, help="prompts per call (default 25)")
    w.add_argument("--search-chunk", type=POS_INT, default=None, help="prompts per call of those methods "
                   "(default 4)")
    w.add_argument("--seed", type=NONNEG_INT, default=None)
    w.set_defaults(fn=cmd_w2s)

    b = _with_examples(sub.add_parser("bench", help="run a benchmark script (decode, speculative, search, train)",
                                      description="Run one of the repository's benchmark scripts; the arguments "
                                      "after its name are passed through."), "bench")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(fn=cmd_bench)
    return p


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------

def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def error_line(e: BaseException, args) -> tuple[str, int]:
    """(the one-line message, exit status) for an exception: expected failures get their problem and a fix,
    anything else is reported as an internal error with a pointer to --debug."""
    from rss_jax.loading.names import CheckpointError
    from rss_jax.models.config import ConfigError
    from rss_jax.models.feature_head import HeadTargetMismatch
    command = getattr(args, "command", None) or ""
    note = getattr(e, "rss_jax_note", "")
    note = f" ({note})" if note else ""
    if isinstance(e, CLIError):
        return e.line() + note, 2
    msg = " ".join(str(e).split())
    if _is_oom(e):
        if getattr(e, "rss_jax_running", False) and command == "generate":
            where = f"compiling or running --method {args.method} with --batch-size {args.batch_size}"
        else:
            where = "loading the model"
        return (f"out of memory while {where}{note}; lower --batch-size or --max-new-tokens, use --dtype "
                "bfloat16, or spread the model over more devices with --mesh"), 2
    with_fix = ";" in msg  # the library's messages usually say what to do after a semicolon
    if isinstance(e, HeadTargetMismatch):
        fix = "use a head made for this --model (`rss-jax info HEAD` shows the target a head belongs to)"
    elif isinstance(e, CheckpointError):
        fix = "the checkpoint is damaged or incomplete: download or convert it again"
    elif isinstance(e, ConfigError):
        fix = "rss_jax reads Llama-family (Llama, Mistral, Qwen2, SmolLM), GPT-2 and OPT checkpoints"
    elif isinstance(e, FileNotFoundError):
        fix = f"check the path, or use a built-in model name ({BUILTIN_MODEL})"
    elif isinstance(e, FileExistsError):
        fix = "pass --overwrite to replace it or choose another output"
    elif isinstance(e, (IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError)):
        fix = "check the path and its permissions"
    elif isinstance(e, FloatingPointError):  # a diverged training run
        fix = "lower --learning-rate or raise --grad-accum"
    elif isinstance(e, ValueError):
        fix = f"see `rss-jax {command} --help`" if command else "see `rss-jax --help`"
    else:
        return (f"internal error ({type(e).__name__}: {msg[:300]}){note}; rerun with --debug for the traceback and "
                "report it"), 1
    return (msg + note if with_fix else f"{msg}{note}; {fix}"), 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:  # everything after the name goes through
        try:
            return run_bench(argv[1], argv[2:])
        except CLIError as e:
            one_line(e.line())
            return 2
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from rss_jax.loading import enable_compile_cache
    enable_compile_cache()
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
            return e.code if isinstance(e.code, int) else 2
        return int(args.fn(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        note = getattr(e, "rss_jax_note", "")
        print(f"rss-jax: interrupted{'; ' + note if note else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            raise
        line, status = error_line(e, args)
        one_line(line)
        return status


if __name__ == "__main__":  # `python -m rss_jax.cli`: run the package's module, whose classes cli_generate shares
    from rss_jax.cli import main as package_main
    sys.exit(package_main())
