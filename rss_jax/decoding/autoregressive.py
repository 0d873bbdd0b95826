"""Autoregressive decoding: one prefill, then one lax.while_loop that decodes every row of the batch.

Prompts are right-padded to a power-of-two bucket; each row's cache length starts at its own prompt length, so the
padding slots are overwritten by the row's first generated tokens before anything can attend to them. Sampling is
keyed by (row id, position), so a row's tokens do not depend on the batch it is in.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from rss_jax import sampling
from rss_jax.cache import init_cache
from rss_jax.decoding import common
from rss_jax.models.base import compute_dtype, decode_model


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static (hashable) sampling knobs: part of the compiled loop's identity."""
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    eos: tuple = ()
    vocab: int | None = None  # sample among the first `vocab` ids only (a model may have more rows than its tokenizer)

    def sample(self, keys, logits):
        """keys [B] typed keys, logits [B, V] -> tokens [B] int32."""
        if self.vocab is not None and self.vocab < logits.shape[-1]:
            logits = logits[..., :self.vocab]
        return sampling.sample_rows(keys, logits, self.temperature, self.top_k, self.top_p, self.min_p)


def sampler_config(lm, max_new_tokens, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   eos=None) -> SamplerConfig:
    """Validated static sampling knobs for `lm` (eos=None: the model's EOS ids; [] never stops early)."""
    sampling.validate_sampling_args(temperature, top_k, top_p, min_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return SamplerConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                         top_p=None if top_p is None else float(top_p), min_p=None if min_p is None else float(min_p),
                         eos=common.resolve_eos(lm, eos), vocab=min(lm.vocab_size, lm.config.vocab_size))


def row_keys(base_key, row_ids, position):
    return jax.vmap(lambda r: common.row_key(base_key, r, position))(row_ids)


def prefill(model, prompt_tokens, prompt_lens, capacity: int):
    """Write the prompts into a fresh cache. Returns (logits at each row's last prompt token [B, V], cache)."""
    b = prompt_tokens.shape[0]
    dtype = compute_dtype(model)
    cache = init_cache(model.config, b, capacity, dtype)
    logits, cache = model(prompt_tokens, cache=cache, lengths=jnp.zeros((b,), jnp.int32))
    last = jnp.take_along_axis(logits, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


def start_decode(model, cfg: SamplerConfig, prompt_tokens, prompt_lens, row_ids, base_key, fanout: int = 1):
    """Prefill the prompts, fan every prompt out to `fanout` consecutive rows (one prefill shared by all of them) and
    sample generated position 0. row_ids [B * fanout] are the global row ids of the fanned-out rows.

    Returns the decode state (tok [B'], cache, lengths [B'], out [B', max_new_tokens], done [B']) with B' = B * fanout:
    `tok` is the last sampled token, not yet written to the cache (it is fed by the next decode step), `lengths` the
    cache slots in use per row."""
    b, p = prompt_tokens.shape
    n = cfg.max_new_tokens
    last, cache = prefill(model, prompt_tokens, prompt_lens, p + n)
    lengths = prompt_lens
    if fanout > 1:
        last = jnp.repeat(last, fanout, axis=0)
        cache = cache.repeat_rows(fanout)
        lengths = jnp.repeat(prompt_lens, fanout)
    tok = cfg.sample(row_keys(base_key, row_ids, 0), last)
    out = jnp.full((b * fanout, n), -1, jnp.int32).at[:, 0].set(tok)
    done = common.is_eos(tok, cfg.eos) | (n == 1)
    return tok, cache, lengths, out, done


def decode_steps(model, cfg: SamplerConfig, decode_state, start, stop, row_ids, base_key):
    """Resume decoding: sample generated positions start .. stop-1 (start, stop may be traced; stop <=
    max_new_tokens), or fewer if every row is done. decode_state as returned by `start_decode` (or a previous call,
    possibly with rows gathered in between: every field is per row). Returns (decode_state, next position)."""

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < stop) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, lengths, out, done = carry
        logits, cache = model(jnp.maximum(tok, 0)[:, None], cache=cache, lengths=lengths)
        new = cfg.sample(row_keys(base_key, row_ids, i), logits[:, 0])
        new = jnp.where(done, -1, new)
        out = jax.lax.dynamic_update_index_in_dim(out, new, i, axis=1)
        done = done | common.is_eos(new, cfg.eos) | (i + 1 >= cfg.max_new_tokens)
        # a done row keeps its last real token pending, so a later gather never feeds -1 to the model
        return i + 1, jnp.where(done & (new < 0), tok, new), cache, lengths + 1, out, done

    i, tok, cache, lengths, out, done = jax.lax.while_loop(
        cond, body, (jnp.asarray(start, jnp.int32), *decode_state))
    return (tok, cache, lengths, out, done), i


def ar_loop(graphdef, cfg: SamplerConfig, state, prompt_tokens, prompt_lens, row_ids, base_key):
    """-> (tokens [B, max_new_tokens] int32 padded with -1, steps run)."""
    model = decode_model(graphdef, state)
    decode_state = start_decode(model, cfg, prompt_tokens, prompt_lens, row_ids, base_key)
    decode_state, i = decode_steps(model, cfg, decode_state, 1, cfg.max_new_tokens, row_ids, base_key)
    return decode_state[3], i


def generate_ar(lm, prompt_ids, cfg: SamplerConfig, seed: int = 0, row_ids=None):
    t0 = time.perf_counter()
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    if row_ids is None:
        row_ids = jnp.arange(len(prompt_ids), dtype=jnp.int32)
    base_key = jax.random.key(seed)
    (out, steps), compile_s, run_s = common.COMPILED.call(
        ar_loop, (lm.graphdef, cfg), lm.state, tokens, lens, jnp.asarray(row_ids, jnp.int32), base_key)
    stats = {"method": "ar", "compile_s": compile_s, "wall_s": run_s, "steps": int(steps),
             "target_calls": int(steps), "total_s": time.perf_counter() - t0}
    return out, stats
