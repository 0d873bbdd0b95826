"""`rss-jax generate`: any decoding or search method over prompts from --prompt, a JSONL file or stdin.

Rows are processed in batches fixed by input position: rows [0, B), [B, 2B), ... with B = --batch-size. Methods
whose random streams are keyed by the prompt's index (ar, sd, sss, eft, gsi, rsd, args, cards) get the batch's start
as `prompt_offset` and the same seed for every batch; the others (bon, soft-bon, spr, rs, treebon: their row keys
depend on the batch's size) get a seed derived from (--seed, batch start), the plain --seed for the first batch.
Either way a row's output depends only on its input, the settings and its batch, and `--resume` keeps whole batches
(a trailing batch that was cut short is redone), so a resumed file equals an uninterrupted run's file.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile

from rss_jax.cli import (BUILTIN_MODEL, FLOAT, NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, CLIError, build_mesh,
                         int_list, mesh_spec, number)
from rss_jax.report import public_mode

METHODS = ("ar", "sd", "sss", "eft", "bon", "soft-bon", "spr", "gsi", "rsd", "args", "cards", "rs", "treebon")
REWARD_METHODS = ("bon", "soft-bon", "spr", "gsi", "rsd", "args", "cards", "rs", "treebon")
PER_ROW = ("ar", "sd", "sss", "eft", "gsi", "rsd", "args", "cards")  # take prompt_offset: keys by prompt index
SEARCH_MODES = ("paper", "authors_code")
MODES = {"sss": ("exact", "paper", "authors_code"), "args": SEARCH_MODES, "cards": SEARCH_MODES,
         "rs": SEARCH_MODES, "treebon": SEARCH_MODES}
HEAD_SFT, HEAD_ALIGNED = "smollm2-135m-instruct-head-sft", "smollm2-135m-instruct-head-aligned"
ALL = set(METHODS)

# sampling knobs: the methods that take each one (a knob given to another method is an error, not silently dropped)
SAMPLING = {
    "temperature": ALL - {"args"},
    "top_k": ALL - {"args"},
    "top_p": ALL - {"args", "cards"},
    "min_p": {"ar", "sd", "sss", "eft", "bon", "soft-bon", "spr", "gsi", "rsd"},
}
# method knobs: (flag, type, methods, help); unset knobs take the library's defaults (or the CLI's, in the help)
KNOBS = [
    ("--k", POS_INT, {"sd", "sss", "args"}, "sd/sss: draft tokens per block (default 4); args: candidates per "
     "position (default 10; 40 in authors_code)"),
    ("--shift", FLOAT, {"sss", "eft"}, "sss/eft: the reward shift lambda (default 1.0)"),
    ("--draft-top-k", POS_INT, {"sd", "sss"}, "sd/sss: top-k filter of the draft's proposal"),
    ("--draft-top-p", number(float, 0, 1, low_open=True), {"sd", "sss"}, "sd/sss: top-p filter of the proposal"),
    ("--draft-temperature", POS_FLOAT, {"sd", "sss"}, "sd/sss exact: temperature of the proposal (default: "
     "a calibrated head's own, else --temperature's); the output law does not change"),
    ("--n", POS_INT, {"bon", "soft-bon", "spr", "gsi", "rsd", "treebon"}, "bon/soft-bon: samples per prompt "
     "(default 8); spr: initial rows (default 8); gsi: candidate steps (default 16); rsd: drafts per step (default "
     "1); treebon: rows (default 16)"),
    ("--beta", POS_FLOAT, {"soft-bon", "gsi", "rsd", "cards", "rs", "treebon"}, "soft-bon: selection inverse "
     "temperature (default 1.0); gsi/rsd: soft-BoN inverse temperature (default 20); cards/rs/treebon: accept "
     "temperature (default 0.8 / 0.8 / 0.7)"),
    ("--alpha", number(float, 0, 1, high_open=True), {"spr", "cards", "treebon"}, "spr: rejection rate in [0, 1) "
     "(default 0.5); cards/treebon authors_code: where the rising threshold starts (default 0.5)"),
    ("--stops", int_list, {"spr"}, "spr: decision positions, e.g. 4,8,16 (default: powers of two from 4)"),
    ("--kv-budget", POS_INT, {"spr"}, "spr: KV tokens per prompt (memory mode) instead of --stops"),
    ("--u", FLOAT, {"gsi"}, "gsi: accept threshold on the tilted reward (default 0.5)"),
    ("--delta", FLOAT, {"rsd"}, "rsd: accept threshold on the reward (default 0.7)"),
    ("--max-step-tokens", POS_INT, {"gsi", "rsd"}, "gsi/rsd: most tokens per step (default 32)"),
    ("--max-steps", POS_INT, {"gsi", "rsd"}, "gsi/rsd: most steps per response"),
    ("--weight", FLOAT, {"args"}, "args: w in logit + w * reward (default 1.5)"),
    ("--stochastic", None, {"args"}, "args: sample among the candidates (softmax(s / tau)) instead of greedy"),
    ("--tau", POS_FLOAT, {"args"}, "args: temperature of --stochastic (default 0.7)"),
    ("--tau-r", FLOAT, {"cards", "rs", "treebon"}, "cards/rs (required) and treebon authors_code (required): the "
     "reward threshold, on the reward's scale"),
    ("--tau-u", POS_FLOAT, {"cards"}, "cards: entropy (nats) that ends a segment (default 3.0)"),
    ("--max-tries", POS_INT, {"cards", "rs", "treebon"}, "cards/rs/treebon authors_code: candidates before the best "
     "is taken (default 21)"),
    ("--min-segment", POS_INT, {"cards"}, "cards: shortest segment (default 4)"),
    ("--max-segment", POS_INT, {"cards"}, "cards: longest segment (default 64)"),
    ("--n-children", POS_INT, {"treebon"}, "treebon: children per kept parent (default 4)"),
    ("--n-layers", POS_INT, {"treebon"}, "treebon: tree layers (default 4)"),
    ("--segment-tokens", POS_INT, {"treebon"}, "treebon authors_code: tokens per segment (default 32)"),
]
CLI_DEFAULTS = {"bon": {"n": 8}, "soft-bon": {"n": 8, "beta": 1.0}, "spr": {"n": 8, "alpha": 0.5}}
RESERVED = ("index", "prompt", "prompt_ids", "text", "token_ids", "num_tokens", "score", "candidate_scores",
            "chosen", "method", "seed", "prompt_offset", "batch", "settings", "stats", "timing")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_generate_parser(sub, decorate):
    g = decorate(sub.add_parser(
        "generate", help="generate with any method, from --prompt, a JSONL file or stdin",
        usage="rss-jax generate [--model M] [--method METHOD] [options] "
              "(--prompt TEXT ... | --input FILE.jsonl | < FILE.jsonl) [--output FILE.jsonl]",
        description="Generate continuations with plain decoding (ar), speculative decoding (sd), reward-shifted\n"
        "speculative sampling (sss), EFT, or a search baseline (bon, soft-bon, spr, gsi, rsd, args, cards, rs,\n"
        "treebon). A method's knobs are flags; a knob given to a method that does not use it is an error."))
    m = g.add_argument_group("models")
    m.add_argument("--model", default=BUILTIN_MODEL, help="HF folder, .gguf file, rss_jax Orbax folder or built-in "
                   f"name (default {BUILTIN_MODEL})")
    m.add_argument("--draft", help="sd: the draft; sss/eft: the aligned draft; gsi/rsd: the small model; treebon: "
                   "the DPO draft. A smaller model over --model's vocabulary, or (not gsi/rsd) a feature-draft head "
                   "of --model. Default with the built-in model: its shipped heads")
    m.add_argument("--sft", help="sss/eft/treebon: the SFT version of --draft (the same kind: model or head)")
    m.add_argument("--reward", help="reward methods: vader (default), a reward-model folder, or FILE.py:NAME / "
                   "module:NAME, a function f(prompt_ids, response_ids) -> floats")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--quantize", choices=("int8",), help="int8 weight-only quantisation of --model, --draft and "
                   "--sft at load time (one scale per 32 weights; products in --dtype); one device only")
    m.add_argument("--mesh", type=mesh_spec, help="place the weights on a device mesh, e.g. data=2,tensor=4")
    m.add_argument("--distributed", action="store_true",
                   help="multi-process run (TPU pod, SLURM, several GPUs hosts): start the same command on every "
                   "process; jax.distributed is initialised first (auto-detected on TPU pods and SLURM, else "
                   "RSS_JAX_COORDINATOR=host:port, RSS_JAX_NUM_PROCESSES, RSS_JAX_PROCESS_ID); every process reads "
                   "the input, process 0 writes the output")
    d = g.add_argument_group("method")
    d.add_argument("--method", default="ar", choices=METHODS)
    d.add_argument("--mode", choices=("exact", "paper", "authors_code"),
                   help="sss: exact (default), paper or authors_code; args/cards/rs/treebon: paper (default) or "
                   "authors_code (the released code's loop)")
    for flag, typ, methods, text in KNOBS:
        if typ is None:
            d.add_argument(flag, action="store_true", default=None, help=text)
        else:
            d.add_argument(flag, type=typ, help=text)
    s = g.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=POS_INT, default=128)
    s.add_argument("--temperature", type=NONNEG_FLOAT, help="0 = greedy (default: the method's, 1.0 for most; "
                   "0.7 for gsi/rsd)")
    s.add_argument("--top-k", type=POS_INT)
    s.add_argument("--top-p", type=number(float, 0, 1, low_open=True))
    s.add_argument("--min-p", type=number(float, 0, 1, high_open=True))
    s.add_argument("--seed", type=NONNEG_INT, default=0)
    s.add_argument("--no-chat", action="store_true", help="do not apply the chat template to text prompts")
    io = g.add_argument_group("input and output")
    io.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    io.add_argument("--input", metavar="FILE.jsonl", help="JSONL prompts (- for stdin)")
    io.add_argument("--output", metavar="FILE.jsonl", help="JSONL results (- for stdout); default: readable text "
                    "on stdout")
    io.add_argument("--batch-size", type=POS_INT, default=8, help="rows per batch (default 8)")
    io.add_argument("--resume", action="store_true", help="keep the rows --output (or its .partial file) holds and "
                    "do the rest")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    io.add_argument("--timing", action="store_true", help="add each batch's timings to the rows (they differ from "
                    "run to run)")
    io.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.set_defaults(fn=cmd_generate)
    return g


# ------------------------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------------------------

def method_settings(args) -> tuple[dict, dict]:
    """-> (method knobs, sampling knobs) given on the command line (dest -> value), checked against --method."""
    method = args.method
    knobs = {}
    for flag, _, methods, _ in KNOBS:
        v = getattr(args, _dest(flag))
        if v is None:
            continue
        if method not in methods:
            raise CLIError(f"{flag} does not apply to --method {method}",
                           f"drop it ({flag} is for {', '.join(sorted(methods))})")
        knobs[_dest(flag)] = v
    for k, v in CLI_DEFAULTS.get(method, {}).items():
        knobs.setdefault(k, v)
    sampling = {}
    for name, methods in SAMPLING.items():
        v = getattr(args, name)
        if v is None:
            continue
        if method not in methods:
            raise CLIError(f"--{name.replace('_', '-')} does not apply to --method {method}", "drop it")
        sampling[name] = v
    if args.mode is not None and args.mode not in MODES.get(method, ()):
        modes = MODES.get(method)
        raise CLIError(f"--mode {args.mode} is not a mode of --method {method}",
                       f"choose one of {', '.join(modes)}" if modes else f"drop --mode (--method {method} has one "
                       "mode; modes: sss exact|paper|authors_code, args/cards/rs/treebon paper|authors_code)")
    if method == "sss" and "draft_temperature" in knobs and args.mode not in (None, "exact"):
        raise CLIError(f"--draft-temperature needs --mode exact (--mode {args.mode} assumes the drafts come from "
                       "the aligned draft at --temperature and never reads the proposal)",
                       "drop --draft-temperature, or use --mode exact")
    if method in ("cards", "rs") and "tau_r" not in knobs:
        raise CLIError(f"--method {method} needs --tau-r, the reward threshold", "give one on the reward's scale, "
                       "e.g. --tau-r 0.5 for VADER (in [-1, 1])")
    if method == "treebon" and args.mode == "authors_code" and "tau_r" not in knobs:
        raise CLIError("--method treebon --mode authors_code needs --tau-r, the threshold on the implicit reward",
                       "the released runs used 22.0 for OPT-6.7B and -6.5 for OPT-13B")
    if method not in REWARD_METHODS and args.reward is not None:
        raise CLIError(f"--reward does not apply to --method {method}",
                       f"drop it, or choose a reward method ({', '.join(REWARD_METHODS)})")
    return knobs, sampling


def draft_specs(args) -> tuple[str | None, str | None, str]:
    """-> (draft, sft, note): the given drafts, the shipped heads for the built-in model, or a clear error."""
    method, draft, sft, note = args.method, args.draft, args.sft, ""
    uses = {"sd": (True, False), "sss": (True, True), "eft": (True, True), "gsi": (True, False),
            "rsd": (True, False), "treebon": (True, args.mode != "authors_code")}
    need_draft, need_sft = uses.get(method, (False, False))
    if not need_draft and draft is not None:
        raise CLIError(f"--draft does not apply to --method {method}", "drop it")
    if not need_sft and sft is not None:
        mode = " --mode authors_code" if method == "treebon" else ""
        raise CLIError(f"--sft does not apply to --method {method}{mode}", "drop it")
    if args.model == BUILTIN_MODEL and draft is None and method in ("sd", "sss", "eft", "treebon"):
        draft = HEAD_SFT if method == "sd" else HEAD_ALIGNED
        sft = sft or (HEAD_SFT if need_sft else None)
        note = f"using the shipped feature-draft heads of {BUILTIN_MODEL} ({draft}{', ' + sft if sft else ''})"
    if need_draft and draft is None:
        what = {"sd": "the draft", "sss": "the aligned draft", "eft": "the aligned draft", "gsi": "the small model",
                "rsd": "the small model", "treebon": "the DPO draft"}[method]
        fix = ("give a smaller model over --model's vocabulary" if method in ("gsi", "rsd") else
               "give a smaller model over --model's vocabulary or a feature-draft head of --model "
               "(`rss-jax train head-distill` makes one)")
        raise CLIError(f"--method {method} needs --draft ({what})", fix)
    if need_sft and sft is None:
        raise CLIError(f"--method {method} needs --sft (the SFT version of --draft)",
                       "give the draft --draft was aligned from (the same kind: a model or a head)")
    return draft, sft, note


def _ident(spec):
    return os.path.abspath(spec) if spec and os.path.exists(spec) else spec


def settings_hash(args, draft, sft, knobs, sampling) -> str:
    """What a row's result depends on (so --resume refuses rows made with other settings)."""
    d = {"model": _ident(args.model), "draft": _ident(draft), "sft": _ident(sft),
         "reward": _ident(args.reward) if args.method in REWARD_METHODS else None, "method": args.method,
         "mode": args.mode, "knobs": knobs, "sampling": sampling, "max_new_tokens": args.max_new_tokens,
         "seed": args.seed, "chat": not args.no_chat, "dtype": args.dtype, "batch_size": args.batch_size,
         **({"quantize": args.quantize} if args.quantize else {})}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch starting at `start` for methods whose keys depend on the batch layout."""
    if start == 0:
        return seed
    import numpy as np
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0] >> 1)


# ------------------------------------------------------------------------------------------------------------------
# input
# ------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    index: int
    where: str  # "FILE:LINE", "<stdin>:LINE" or "--prompt N", for error messages
    text: str | None = None
    ids: list | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def parse_jsonl(lines, name: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not valid JSON ({e.msg}, column {e.colno})",
                           'write one JSON object per line, e.g. {"prompt": "Hello"} or {"prompt_ids": [1, 2, 3]}') \
                from None
        if not isinstance(rec, dict):
            raise CLIError(f"{where}: a JSON {type(rec).__name__}, not an object",
                           'write one JSON object per line, e.g. {"prompt": "Hello"}')
        if "prompt" not in rec and "prompt_ids" not in rec:
            raise CLIError(f"{where}: no \"prompt\" or \"prompt_ids\" field (fields: {', '.join(rec) or 'none'})",
                           'give the prompt as "prompt" (text) or "prompt_ids" (token ids)')
        text, ids = rec.get("prompt"), rec.get("prompt_ids")
        if text is not None and not isinstance(text, str):
            raise CLIError(f"{where}: \"prompt\" must be a string, got a {type(text).__name__}",
                           'give the text as a string, or token ids as "prompt_ids"')
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise CLIError(f"{where}: \"prompt_ids\" must be a list of integers",
                               'e.g. {"prompt_ids": [1, 2, 3]}')
            if not ids:
                raise CLIError(f"{where}: \"prompt_ids\" is empty", "every prompt needs at least one token")
        rows.append(Row(len(rows), where, text, ids, {k: v for k, v in rec.items() if k not in RESERVED}))
    if not rows:
        raise CLIError(f"{name} holds no prompts", 'write one JSON object per line, e.g. {"prompt": "Hello"}')
    return rows


def read_rows(args) -> list[Row]:
    if args.prompt and args.input:
        raise CLIError("give --prompt or --input, not both", "put every prompt in the JSONL file")
    if args.prompt:
        return [Row(i, f"--prompt {i + 1}", text=p) for i, p in enumerate(args.prompt)]
    if args.input in (None, "-"):
        if args.input is None and sys.stdin.isatty():
            raise CLIError("no prompts", "give --prompt TEXT, --input FILE.jsonl, or pipe JSONL into stdin")
        return parse_jsonl(sys.stdin, "<stdin>")
    try:
        with open(args.input, encoding="utf-8") as f:
            return parse_jsonl(f, args.input)
    except FileNotFoundError:
        raise CLIError(f"--input {args.input}: no such file", "check the path") from None
    except IsADirectoryError:
        raise CLIError(f"--input {args.input} is a folder", "give a JSONL file") from None
    except PermissionError:
        raise CLIError(f"--input {args.input}: permission denied", "check the file's permissions") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"--input {args.input}: not UTF-8 text ({e.reason} at byte {e.start})",
                       "give a UTF-8 JSONL file") from None


def encode_rows(rows, lm, chat: bool) -> None:
    from rss_jax.decoding import common
    vocab = lm.vocab_size
    for r in rows:
        if r.ids is None:
            if lm.tokenizer is None:
                raise CLIError(f"{r.where}: the prompt is text but the model {lm.source} has no tokenizer",
                               'give token ids as "prompt_ids" in a JSONL --input')
            r.ids = common.encode_prompts(lm, [r.text], chat)[0] if r.text else []
            if not r.ids:
                raise CLIError(f"{r.where}: the prompt is empty", "every prompt needs at least one token")
        else:
            bad = [t for t in r.ids if not 0 <= t < vocab]
            if bad:
                raise CLIError(f"{r.where}: prompt_ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                               "give token ids of --model's tokenizer")


def context_extra(method, knobs, mode) -> tuple[int, str]:
    """Positions a method needs beyond prompt + max_new_tokens, and how to say so."""
    if method in ("sd", "sss"):
        k = knobs.get("k", 4)
        return k + 1, f" + {k + 1} speculative slots (--k {k})"
    if method in ("eft", "args", "cards") or (method == "treebon" and mode == "authors_code"):
        return 1, " + 1"
    if method in ("gsi", "rsd"):
        s = knobs.get("max_step_tokens", 32)
        return s, f" + {s} step slots (--max-step-tokens {s})"
    return 0, ""


def check_context(rows, models, args, knobs) -> None:
    limit = min(m.config.max_position_embeddings for m in models if m is not None)
    extra, what = context_extra(args.method, knobs, args.mode)
    for r in rows:
        if len(r.ids) + args.max_new_tokens + extra > limit:
            raise CLIError(f"{r.where}: the prompt's {len(r.ids)} tokens + --max-new-tokens {args.max_new_tokens}"
                           f"{what} exceed the model's context of {limit} positions",
                           "shorten the prompt or lower --max-new-tokens")


# ------------------------------------------------------------------------------------------------------------------
# models and rewards
# ------------------------------------------------------------------------------------------------------------------

def _is_head(m) -> bool:
    return getattr(m, "is_feature_head", False)


def check_pair(lm, other, flag: str) -> None:
    """A draft (or reward model) shares --model's vocabulary; a head belongs to --model."""
    if _is_head(other):
        other.check_target(lm)
        return
    a, b = lm.tokenizer, getattr(other, "tokenizer", None)
    if a is not None and b is not None:
        if len(a) != len(b) or a.get_vocab() != b.get_vocab():
            raise CLIError(f"{flag} {other.source} and --model {lm.source} have different vocabularies ({len(b)} "
                           f"vs {len(a)} tokens)", f"give a {flag} that shares --model's tokenizer")
    elif other.config.vocab_size != lm.config.vocab_size:
        raise CLIError(f"{flag} {other.source} has {other.config.vocab_size} embedding rows but --model "
                       f"{lm.source} has {lm.config.vocab_size}: they do not share a vocabulary",
                       f"give a {flag} over --model's vocabulary")


def load_reward(spec, lm, dtype):
    import rss_jax as rj
    if spec is None or spec == "vader":
        if lm.tokenizer is None:
            raise CLIError(f"the VADER reward scores text but the model {lm.source} has no tokenizer",
                           "pass --reward DIR (a reward model over its token ids) or --reward FILE.py:FUNCTION")
        return rj.rewards.vader_reward(lm.tokenizer)
    if os.path.isdir(spec):
        reward = rj.rewards.ModelReward.load(spec, dtype)
        rm_tok = reward.tokenizer
        if lm.tokenizer is not None and rm_tok is not None and lm.tokenizer.get_vocab() != rm_tok.get_vocab():
            raise CLIError(f"--reward {spec} has its own tokenizer ({len(rm_tok)} tokens), not --model's "
                           f"({len(lm.tokenizer)})", "use a reward model with --model's tokenizer, or wrap it in a "
                           "FILE.py:FUNCTION reward that re-tokenises")
        if reward.config.vocab_size < lm.vocab_size:
            raise CLIError(f"--reward {spec} reads {reward.config.vocab_size} token ids but --model's vocabulary has "
                           f"{lm.vocab_size}", "use a reward model over --model's vocabulary")
        return reward
    if ":" in spec:
        where, _, name = spec.rpartition(":")
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise CLIError(f"--reward {where}: no such file", "check the path (FILE.py:FUNCTION)")
            mspec = importlib.util.spec_from_file_location("rss_jax_user_reward", where)
            module = importlib.util.module_from_spec(mspec)
            try:
                mspec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's code
                raise CLIError(f"--reward {where} failed to import ({type(e).__name__}: {e})", "fix that file") \
                    from e
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as e:
                raise CLIError(f"--reward {spec}: cannot import {where} ({e})",
                               "check the module name, or give FILE.py:FUNCTION") from None
        if not hasattr(module, name):
            raise CLIError(f"--reward {spec}: {where} has no {name!r}", "name a function f(prompt_ids, "
                           "response_ids) -> floats defined there")
        try:
            return rj.rewards.as_reward(getattr(module, name), lm.tokenizer)
        except TypeError as e:
            raise CLIError(f"--reward {spec}: {e}", "name a function f(prompt_ids, response_ids) -> floats") \
                from None
    if os.path.exists(spec):
        raise CLIError(f"--reward {spec} is a file, not a reward-model folder",
                       "give the reward model's folder, or FILE.py:FUNCTION for a Python reward")
    raise CLIError(f"unknown --reward {spec!r}: not vader, a reward-model folder or FILE.py:NAME / module:NAME",
                   "check the path")


def make_runner(args, lm, draft, sft, reward, knobs, sampling):
    """-> run(prompt_ids, seed, prompt_offset) calling the method's library function."""
    import rss_jax as rj
    m, kn = args.method, knobs

    def opt(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    base = dict(max_new_tokens=args.max_new_tokens, chat=False, **sampling)
    if m in ("ar", "sd", "sss", "eft"):
        kw = opt(k=kn.get("k"), shift=kn.get("shift"), draft_top_k=kn.get("draft_top_k"),
                 draft_top_p=kn.get("draft_top_p"), draft_temperature=kn.get("draft_temperature"), mode=args.mode)
        return lambda ids, seed, off: rj.generate(lm, ids, method=m, draft=draft, sft=sft, seed=seed,
                                                  prompt_offset=off, **kw, **base)
    if m in ("bon", "soft-bon"):
        beta = kn["beta"] if m == "soft-bon" else None
        return lambda ids, seed, off: rj.best_of_n(lm, ids, reward, n=kn["n"], beta=beta, seed=seed, **base)
    if m == "spr":
        kw = opt(stops=kn.get("stops"), kv_budget=kn.get("kv_budget"))
        return lambda ids, seed, off: rj.speculative_rejection(lm, ids, reward, kn["alpha"], kn["n"], seed=seed,
                                                               **kw, **base)
    if m in ("gsi", "rsd"):
        fn = rj.gsi if m == "gsi" else rj.rsd
        kw = opt(n=kn.get("n"), beta=kn.get("beta"), u=kn.get("u"), delta=kn.get("delta"),
                 max_step_tokens=kn.get("max_step_tokens"), max_steps=kn.get("max_steps"))
        return lambda ids, seed, off: fn(draft, lm, ids, reward, seed=seed, prompt_offset=off, **kw, **base)
    if m == "args":
        kw = opt(k=kn.get("k"), weight=kn.get("weight"), greedy=False if kn.get("stochastic") else None,
                 tau=kn.get("tau"), mode=args.mode)
        return lambda ids, seed, off: rj.args(lm, ids, reward, seed=seed, prompt_offset=off, **kw,
                                              max_new_tokens=args.max_new_tokens, chat=False)
    if m == "cards":
        kw = opt(tau_u=kn.get("tau_u"), alpha=kn.get("alpha"), beta=kn.get("beta"), mode=args.mode,
                 max_tries=kn.get("max_tries"), min_segment=kn.get("min_segment"),
                 max_segment=kn.get("max_segment"))
        return lambda ids, seed, off: rj.cards(lm, ids, reward, kn["tau_r"], seed=seed, prompt_offset=off, **kw,
                                               **base)
    if m == "rs":
        kw = opt(beta=kn.get("beta"), max_tries=kn.get("max_tries"), mode=args.mode)
        return lambda ids, seed, off: rj.rejection_sampling(lm, ids, reward, kn["tau_r"], seed=seed, **kw, **base)
    if m == "treebon":
        kw = opt(n=kn.get("n"), n_children=kn.get("n_children"), n_layers=kn.get("n_layers"), mode=args.mode,
                 tau_r=kn.get("tau_r"), alpha=kn.get("alpha"), beta=kn.get("beta"),
                 segment_tokens=kn.get("segment_tokens"), max_tries=kn.get("max_tries"))
        return lambda ids, seed, off: rj.treebon(lm, ids, reward, dpo=draft, sft=sft, seed=seed, **kw, **base)
    raise CLIError(f"unknown --method {m!r}", f"choose one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------

def jsonable(x):
    """Plain JSON values: arrays to lists, NaN and infinities to null, anything else to its string."""
    import numpy as np
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def is_timing(key: str) -> bool:
    return key.endswith("_s") or key == "s_per_step"


class Output:
    """The JSONL result file. Finished batches are appended to `.NAME.partial` beside it (fsynced), and the
    partial file is renamed to NAME when the run ends: NAME never holds a half-written run."""

    def __init__(self, path: str | None, resume: bool, overwrite: bool):
        self.path, self.file, self.kept_from = path, None, None
        self.stdout = path == "-"
        self.partial = None
        if path is None or self.stdout:
            if resume:
                raise CLIError("--resume needs --output FILE.jsonl", "give the file the first run wrote")
            return
        if os.path.isdir(path):
            raise CLIError(f"--output {path} is a folder", "give a file name such as out.jsonl")
        folder, base = os.path.split(os.path.abspath(path))
        self.partial = os.path.join(folder, f".{base}.partial")
        if os.path.exists(path) and not (resume or overwrite):
            raise CLIError(f"--output {path} exists", "pass --resume to continue it, --overwrite to replace it, or "
                           "choose another --output")
        parent = folder
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise CLIError(f"cannot write --output {path}: {parent} is not writable", "choose another --output")

    def previous(self) -> tuple[list, str | None]:
        """Rows of an interrupted run (the partial file) or of a finished one (the output file)."""
        for src in (self.partial, self.path):
            if src and os.path.exists(src):
                return read_previous(src), src
        return [], None

    writer = True  # False on the processes other than 0 of a multi-process run

    def start(self, kept: list, kept_from: str | None) -> None:
        if self.partial is None or not self.writer:
            return
        folder = os.path.dirname(self.partial)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            public_mode(tmp)
            os.replace(tmp, self.partial)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.file = open(self.partial, "a", encoding="utf-8")
        self.kept, self.added, self.kept_from = len(kept), 0, kept_from

    def add(self, lines: list) -> None:
        if not self.writer:
            return
        if self.stdout:
            sys.stdout.writelines(lines)
            sys.stdout.flush()
        elif self.file is not None:
            self.file.writelines(lines)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.added += len(lines)

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            os.replace(self.partial, self.path)

    def abort(self) -> str:
        """After a failure: keep the partial file if it holds rows the output file does not, else remove it.
        Returns a note for the error message."""
        if not self.writer:
            return ""
        if self.file is None:
            return ""
        self.file.close()
        rows = self.kept + self.added
        if self.added or (self.kept and self.kept_from == self.partial):
            return f"the {rows} finished rows are kept in {self.partial}: rerun the same command with --resume"
        os.remove(self.partial)
        return ""


def read_previous(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not line.endswith("\n"):
                break  # the last line of an interrupted write: redone
            raise CLIError(f"{path}:{i}: not valid JSON, so the run cannot be resumed from it",
                           "remove the file and run again without --resume") from None
        out.append(line if line.endswith("\n") else line + "\n")
    return out


def kept_rows(lines: list, src: str, rows: list, settings: str, batch_size: int) -> list:
    """The previous run's lines to keep: every complete batch, checked against this run's input and settings."""
    n = len(rows)
    recs = [json.loads(x) for x in lines]
    if len(recs) > n:
        raise CLIError(f"{src} holds {len(recs)} rows but the input has {n}", "resume with the same input, or a "
                       "longer one")
    for j, rec in enumerate(recs):
        if not isinstance(rec, dict) or rec.get("settings") != settings:
            raise CLIError(f"{src} was written with other settings (method, models, knobs, sampling, seed, "
                           "--max-new-tokens or --batch-size)", "resume with the first run's settings, or write to a "
                           "new --output")
        if rec.get("index") != j or rec.get("prompt_ids") != rows[j].ids:
            raise CLIError(f"{src}: row {j} was made for another prompt than input row {j} ({rows[j].where})",
                           "resume with the input the file was made from, or write to a new --output")
    keep = 0
    while keep < len(recs):
        start, stop = keep, min(keep + batch_size, n)
        if stop > len(recs) or any(recs[j].get("batch") != [start, stop] for j in range(start, stop)):
            break
        keep = stop
    return lines[:keep]


def row_records(rows, out, method, seed, offset, settings, timing) -> list[dict]:
    stats = dict(out.stats)
    times = {k: stats.pop(k) for k in list(stats) if is_timing(k)}
    stats = jsonable(stats)
    start, stop = rows[0].index, rows[-1].index + 1
    recs = []
    for j, r in enumerate(rows):
        n = int(out.lengths[j])
        rec = {"index": r.index, "prompt": r.text, "prompt_ids": r.ids,
               "text": out.texts[j] if out.texts is not None else None,
               "token_ids": [int(t) for t in out.tokens[j][:n]], "num_tokens": n}
        for name, key in (("scores", "score"), ("candidate_scores", "candidate_scores"), ("chosen", "chosen")):
            v = getattr(out, name, None)
            if v is not None:
                rec[key] = jsonable(v[j])
        rec.update(jsonable(r.extra))
        rec.update(method=method, seed=seed, prompt_offset=offset, batch=[start, stop], settings=settings,
                   stats=stats)
        if timing:
            rec["timing"] = jsonable(times)
        recs.append(rec)
    return recs


def summary(method, recs, outs) -> tuple[dict, list]:
    import numpy as np
    tokens = sum(r["num_tokens"] for r in recs)
    wall = sum(o.stats.get("wall_s", 0.0) for o in outs)
    row = {"method": method, "rows": len(recs), "new tokens": tokens,
           "tokens/row": tokens / len(recs) if recs else None, "wall s": wall,
           "tokens/s": tokens / wall if wall > 0 else None,
           "compile s": sum(o.stats.get("compile_s", 0.0) for o in outs)}
    scores = [r["score"] for r in recs if r.get("score") is not None]
    if scores:
        row["mean score"] = float(np.mean(scores))
    st = [o.stats for o in outs]
    if st and all("row_blocks_total" in s for s in st) and st[0].get("k"):
        blocks = sum(s["row_blocks_total"] for s in st)
        row["acceptance"] = sum(s["accepted"] for s in st) / (st[0]["k"] * blocks) if blocks else None
    elif st and all("accepted_steps" in s for s in st):
        steps = sum(s["steps"] for s in st)
        row["acceptance"] = sum(s["accepted_steps"] for s in st) / steps if steps else None
    forwards = [s.get("target_forwards", s.get("target_calls")) for s in st]
    if st and all(f is not None for f in forwards):
        row["target forwards"] = sum(forwards)
    return row, list(row)


def show_text(recs) -> None:
    for r in recs:
        prompt = r["prompt"] if r["prompt"] is not None else f"prompt_ids {r['prompt_ids']}"
        text = r["text"] if r["text"] is not None else f"token_ids {r['token_ids']}"
        score = f"  (score {r['score']:.4g})" if isinstance(r.get("score"), float) else ""
        print(f"=== [{r['index']}] {prompt}{score}\n{text.strip() if r['text'] is not None else text}\n", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------------

def check_mesh_batches(mesh, n_rows: int, batch_size: int) -> None:
    """On a mesh every batch is split over the batch axes: --batch-size and the last batch must divide evenly."""
    if mesh is None:
        return
    from rss_jax import sharding
    sizes = sorted({min(batch_size, n_rows), n_rows % batch_size or batch_size})
    for rows in sizes:
        try:
            sharding.check_batch(mesh, rows)
        except ValueError as e:
            raise CLIError(f"--mesh {dict(mesh.shape)} cannot split a batch of {rows} rows ({e})",
                           "choose a --batch-size (and an input length) that the data and fsdp axes divide") \
                from None


def cmd_generate(args) -> int:
    import rss_jax as rj
    from rss_jax.report import table

    from rss_jax import sharding
    if getattr(args, "distributed", False):
        sharding.initialize()
    main = sharding.is_main_process()  # every process decodes the same rows; only process 0 writes and prints
    knobs, sampling = method_settings(args)
    draft_spec, sft_spec, note = draft_specs(args)
    output = Output(args.output, args.resume, args.overwrite)
    output.writer = main  # every process reads a previous run (to agree on where to resume); process 0 writes
    rows = read_rows(args)
    mesh = build_mesh(args.mesh)
    check_mesh_batches(mesh, len(rows), args.batch_size)
    if note and main:
        print(f"rss-jax: {note}", file=sys.stderr)
    lm = rj.load(args.model, dtype=args.dtype, mesh=mesh, quantize=args.quantize)
    if _is_head(lm):
        raise CLIError(f"--model {args.model} is a feature-draft head", "give the full model as --model and the "
                       "head as --draft")
    draft = rj.load(draft_spec, dtype=args.dtype, mesh=mesh, quantize=args.quantize) if draft_spec else None
    sft = rj.load(sft_spec, dtype=args.dtype, mesh=mesh, quantize=args.quantize) if sft_spec else None
    if args.method in ("gsi", "rsd") and _is_head(draft):
        raise CLIError(f"--draft {draft_spec} is a feature-draft head but --method {args.method} needs a separate "
                       "small model", "give a smaller model over --model's vocabulary")
    for m, flag in ((draft, "--draft"), (sft, "--sft")):
        if m is not None:
            check_pair(lm, m, flag)
    reward = load_reward(args.reward, lm, args.dtype) if args.method in REWARD_METHODS else None
    encode_rows(rows, lm, not args.no_chat)
    check_context(rows, [lm, draft if not _is_head(draft) else None, sft if not _is_head(sft) else None], args,
                  knobs)
    run = make_runner(args, lm, draft, sft, reward, knobs, sampling)
    settings = settings_hash(args, draft_spec, sft_spec, knobs, sampling)

    kept, src = [], None
    if args.resume:
        previous, src = output.previous()
        kept = kept_rows(previous, src, rows, settings, args.batch_size)
        if previous:
            redo = len(previous) - len(kept)
            print(f"rss-jax: resuming from {src}: {len(kept)} rows kept"
                  f"{f', {redo} rows of a batch cut short redone' if redo else ''}", file=sys.stderr)
    start0 = len(kept)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(rows), initial=start0, unit="row", desc=args.method, file=sys.stderr, dynamic_ncols=True,
               disable=None if (args.progress and main) else True)
    recs, outs = [], []
    output.start(kept, src)
    try:
        for start in range(start0, len(rows), args.batch_size):
            batch = rows[start: start + args.batch_size]
            per_row = args.method in PER_ROW
            seed = args.seed if per_row else batch_seed(args.seed, start)
            offset = start if per_row else None
            out = run([r.ids for r in batch], seed, offset if per_row else 0)
            new = row_records(batch, out, args.method, seed, offset, settings, args.timing)
            output.add([json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in new])
            if args.output is None and main:
                bar.clear()
                show_text(new)
            recs += new
            outs.append(out)
            bar.update(len(batch))
        bar.close()
        output.finish()
    except BaseException as e:
        bar.close()
        e.rss_jax_note = output.abort()
        e.rss_jax_running = True
        raise
    if recs and main:
        row, cols = summary(args.method, recs, outs)
        print(table([row], cols), file=sys.stderr if output.stdout else sys.stdout)
    if output.partial is not None and main:
        print(f"wrote {args.output} ({len(rows)} rows{f', {len(recs)} new' if start0 else ''})",
              file=sys.stderr if output.stdout else sys.stdout)
    return 0
