"""What every decoding method shares: prompt encoding and bucketing, per-row PRNG keys, output assembly, and a
cache of compiled loops so that a new prompt length in the same bucket does not compile again."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rss_jax import sharding

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerateOutput:
    """texts (None without a tokenizer), tokens [B, max_new_tokens] int32 padded with -1 after lengths[i],
    lengths [B], stats (dict)."""
    texts: list | None
    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict
    prompt_ids: list | None = None


def is_single_prompt(prompts) -> bool:
    """One bare prompt (a string, or one flat list of token ids) rather than a list of prompts."""
    return isinstance(prompts, (str, bytes)) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))


def encode_prompts(lm, prompts, chat: bool = True) -> list[list[int]]:
    """Strings (chat template when chat=True) or lists of token ids -> lists of ids, validated."""
    if is_single_prompt(prompts):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a string or a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            tok = lm.tokenizer
            if tok is None:
                raise ValueError(f"prompt {i} is text but the model {lm.source!r} has no tokenizer; pass token ids")
            if chat and getattr(tok, "chat_template", None):
                text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(p)["input_ids"]
        else:
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if t < 0 or t >= lm.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {lm.vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


SEARCH_MODES = ("paper", "authors_code")  # the SSS paper's baselines: the published method, or its released code


def check_search_mode(mode):
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {SEARCH_MODES}")


def bucket(n: int) -> int:
    """Power-of-two prompt bucket (at least MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def check_context(lm, prompt_ids, max_new_tokens: int, extra: int = 0):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = lm.config.max_position_embeddings
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens + extra > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens}"
                         f"{f' + {extra} speculative slots' if extra else ''} exceeds the model's context of {limit} "
                         "positions; shorten the prompt or lower max_new_tokens")


def pad_prompts(prompt_ids, width: int, pad: int = 0):
    tokens = np.full((len(prompt_ids), width), pad, np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompt_ids], jnp.int32)


def resolve_eos(lm, eos) -> tuple:
    if eos is None:
        return tuple(lm.eos_token_ids)
    if isinstance(eos, (int, np.integer)):
        return (int(eos),)
    return tuple(int(e) for e in eos)


def row_key(base_key, row_id, position):
    """The PRNG key of (row, position): a row's samples do not depend on which batch it is in."""
    return jax.random.fold_in(jax.random.fold_in(base_key, row_id), position)


def is_eos(tokens, eos: tuple):
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, jnp.int32))


def finish_output(lm, tokens, prompt_ids, stats: dict) -> GenerateOutput:
    tokens = np.asarray(tokens)
    lengths = (tokens >= 0).sum(axis=1).astype(np.int32)
    texts = None
    if lm.tokenizer is not None:
        texts = [lm.tokenizer.decode(row[: n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, lengths)]
    new_tokens = int(lengths.sum())
    stats["new_tokens"] = new_tokens
    wall = stats.get("wall_s", 0.0)
    stats["tokens_per_s"] = new_tokens / wall if wall > 0 else float("nan")
    return GenerateOutput(texts=texts, tokens=tokens, lengths=lengths, stats=stats, prompt_ids=prompt_ids)


# XLA's CPU options for the compiled loops: YNNPACK fusions for matrix products only. Its reduction fusions were
# slow on the few-token attention reductions of a decode step (a few kilobytes each; docs/benchmarks.md), where
# XLA's own loop fusions are faster; its matrix products are kept for the prefills
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options() -> dict | None:
    """The compiler options of the compiled loops on this process's default backend (None: XLA's defaults)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


class CompiledCache:
    """Ahead-of-time compiled loops keyed by (function, static config, argument shapes): compile time is measured
    apart from run time, and a call that hits the cache compiles nothing."""

    def __init__(self):
        self.entries: dict = {}
        self.compiles = 0

    def call(self, fn, static: tuple, *args) -> tuple[Any, float, float]:
        """Run fn(*static, *args) jitted with `static` as static arguments. Returns (out, compile_s, run_s).

        When an argument lives on a mesh (a model loaded with `mesh=`), the loop is traced under that mesh, so that
        the KV caches it creates are sharded to match; on several processes host inputs become replicated global
        arrays and the outputs are gathered back to every process (NumPy)."""
        mesh = sharding.mesh_of(args)
        if mesh is None:
            return self._call(fn, static, args)
        multi = jax.process_count() > 1
        if multi:
            args = sharding.to_global(args, mesh)
        with jax.set_mesh(mesh):
            out, compile_s, run_s = self._call(fn, static, args)
        return (sharding.to_host(out) if multi else out), compile_s, run_s

    def _call(self, fn, static, args):
        # shapes, dtypes and shardings: the same model placed on a mesh needs its own executable
        shapes = tuple((a.shape, str(a.dtype), getattr(a, "sharding", None)) if hasattr(a, "shape") else type(a)
                       for a in jax.tree.leaves(args))
        key = (fn, static, jax.tree.structure(args), shapes)
        compiled = self.entries.get(key)
        compile_s = 0.0
        if compiled is None:
            t0 = time.perf_counter()
            jitted = jax.jit(fn, static_argnums=tuple(range(len(static))))
            compiled = jitted.lower(*static, *args).compile(compiler_options=compiler_options())
            compile_s = time.perf_counter() - t0
            self.entries[key] = compiled
            self.compiles += 1
        t0 = time.perf_counter()
        out = compiled(*args)
        out = jax.block_until_ready(out)
        return out, compile_s, time.perf_counter() - t0


COMPILED = CompiledCache()
