"""Step-level decoding shared by GSI and RSD: generate candidate steps, score steps under another model, commit one.

A *context* is one prompt's state in one model: a one-row KV cache holding every context token but the last, that
last token (`pending`, fed by the next forward), the number of cache slots in use, and tokens committed by the other
model that this one has not read yet (`unsynced`, fed lazily in blocks of S tokens before the model is next used).

Every compiled function has static shapes: n candidate rows, S = max_step_tokens slots per step. A step ends at a
token in the step-end mask (a token whose text contains a blank line, or `step_end_ids`), at EOS, or after S tokens
(or the remaining token budget). Log-probabilities are those of the distribution actually sampled (temperature and
filters applied), or of softmax(logits / logprob_temperature) when that knob is set.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax import sampling
from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import SamplerConfig, prefill


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static knobs of the step functions (hashable: part of the compiled function's identity)."""
    sampler: SamplerConfig  # temperature, filters, eos (max_new_tokens is not used here)
    max_step_tokens: int  # S
    logprob_temperature: float | None = None

    def process(self, logits):
        s = self.sampler
        return sampling.process_logits(logits, s.temperature, s.top_k, s.top_p, s.min_p)

    def log_probs(self, logits):
        """[..., V] -> log-probs [..., V] used for the GSI tilt."""
        if self.logprob_temperature is not None:
            return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / self.logprob_temperature, axis=-1)
        return jax.nn.log_softmax(self.process(logits), axis=-1)


def gen_step(graphdef, scfg: StepConfig, n: int, state, cache, length, pending, step_end, row_ids, base_key, pos0,
             limit):
    """Sample n candidate steps from one context. cache: one row; length, pending [1]; step_end [V] bool; row_ids
    [n]; pos0 = generated position of the step's first token (keys are row_key(base_key, row, pos0 + t)); limit =
    most tokens this step may take (<= S). Returns (steps [n, S] int32 padded with -1, step_len [n], logp [n] the
    steps' log-probs under the tilt's log-probs, cache with n rows)."""
    model = nnx.merge(graphdef, state)
    s_max = scfg.max_step_tokens
    cache = cache.repeat_rows(n)
    lengths = jnp.repeat(length, n)
    tok = jnp.repeat(pending, n)

    def cond(carry):
        t, _, _, _, _, _, done = carry
        return (t < s_max) & ~jnp.all(done)

    def body(carry):
        t, tok, cache, lengths, steps, logp, done = carry
        logits, cache = model(tok[:, None], cache=cache, lengths=lengths)
        x = scfg.process(logits[:, 0])
        keys = jax.vmap(lambda r: common.row_key(base_key, r, pos0 + t))(row_ids)
        if scfg.sampler.temperature == 0:
            new = jnp.argmax(x, axis=-1).astype(jnp.int32)
        else:
            new = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, x).astype(jnp.int32)
        lp = jnp.take_along_axis(scfg.log_probs(logits[:, 0]), new[:, None], axis=1)[:, 0]
        logp = logp + jnp.where(done, 0.0, lp)
        new = jnp.where(done, -1, new)
        steps = jax.lax.dynamic_update_index_in_dim(steps, new, t, axis=1)
        ended = step_end[jnp.maximum(new, 0)] | common.is_eos(new, scfg.sampler.eos) | (t + 1 >= limit)
        return t + 1, jnp.where(done, tok, new), cache, lengths + 1, steps, logp, done | ended

    init = (jnp.int32(0), tok, cache, lengths, jnp.full((n, s_max), -1, jnp.int32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), bool))
    _, _, cache, _, steps, logp, _ = jax.lax.while_loop(cond, body, init)
    return steps, (steps >= 0).sum(axis=1).astype(jnp.int32), logp, cache


def score_steps(graphdef, scfg: StepConfig, state, cache, length, pending, steps):
    """Teacher-force m steps [m, S] (-1 padded) after one context in one batched forward: the cache (fanned out to m
    rows) receives [pending, step[:-1]]. Returns (logp [m] of each step under this model, cache with m rows)."""
    model = nnx.merge(graphdef, state)
    m = steps.shape[0]
    cache = cache.repeat_rows(m)
    inp = jnp.concatenate([jnp.repeat(pending, m)[:, None], jnp.maximum(steps[:, :-1], 0)], axis=1)
    logits, cache = model(inp, cache=cache, lengths=jnp.repeat(length, m))
    lp = jnp.take_along_axis(scfg.log_probs(logits), jnp.maximum(steps, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(steps >= 0, lp, 0.0), axis=1), cache


def prefill_context(graphdef, capacity: int, state, prompt_tokens, prompt_lens):
    model = nnx.merge(graphdef, state)
    _, cache = prefill(model, prompt_tokens, prompt_lens, capacity)
    return cache


@jax.jit
def take_row(cache, row):
    return cache.gather_rows(row[None])


@functools.lru_cache(maxsize=8)
def _text_step_end_mask(tokenizer, vocab: int) -> np.ndarray:
    mask = np.zeros((vocab,), bool)
    for v in range(min(vocab, len(tokenizer))):
        mask[v] = "\n\n" in tokenizer.decode([v])
    return mask


def step_end_mask(lm, step_end_ids=None) -> np.ndarray:
    """[V] bool: tokens that end a step (EOS is handled apart). step_end_ids overrides the blank-line rule; a model
    without a tokenizer has none (steps are max_step_tokens long)."""
    vocab = lm.config.vocab_size
    if step_end_ids is not None:
        mask = np.zeros((vocab,), bool)
        mask[np.asarray(list(step_end_ids), np.int64)] = True
        return mask
    if lm.tokenizer is None:
        return np.zeros((vocab,), bool)
    return _text_step_end_mask(lm.tokenizer, vocab)


class Context:
    """One prompt's decoding state in one model (host object around device arrays)."""

    def __init__(self, lm, scfg: StepConfig, prompt, capacity: int, stats: dict, name: str):
        self.lm, self.scfg, self.stats, self.name = lm, scfg, stats, name
        tokens, lens = common.pad_prompts([prompt], common.bucket(len(prompt)))
        self.cache = self._call(prefill_context, (lm.graphdef, capacity), lm.state, tokens, lens)
        # every prompt token is in the cache; the last one is re-fed as `pending` and overwrites its own slot
        self.length = jnp.asarray([len(prompt) - 1], jnp.int32)
        self.pending = jnp.asarray([prompt[-1]], jnp.int32)
        self.unsynced: list[int] = []

    def _call(self, fn, static, *args):
        out, compile_s, run_s = common.COMPILED.call(fn, static, *args)
        self.stats["compile_s"] += compile_s
        self.stats[f"{self.name}_s"] += run_s
        return out

    def sync(self):
        """Feed tokens committed by the other model, in blocks of S."""
        s_max = self.scfg.max_step_tokens
        while self.unsynced:
            block, self.unsynced = self.unsynced[:s_max], self.unsynced[s_max:]
            steps = np.full((1, s_max), -1, np.int32)
            steps[0, : len(block)] = block
            _, cache = self._call(score_steps, (self.lm.graphdef, self.scfg), self.lm.state, self.cache,
                                  self.length, self.pending, jnp.asarray(steps))
            self.commit(cache, 0, block)
            self.stats[f"{self.name}_calls"] += 1
            self.stats[f"{self.name}_synced_tokens"] += len(block)

    def generate(self, n, mask, row_ids, base_key, pos0, limit):
        """-> (steps [n, S] np, step_len [n] np, logp [n] np, cache with n rows)."""
        self.sync()
        steps, lens, logp, cache = self._call(
            gen_step, (self.lm.graphdef, self.scfg, n), self.lm.state, self.cache, self.length, self.pending, mask,
            jnp.asarray(row_ids, jnp.int32), base_key, jnp.asarray(pos0, jnp.int32), jnp.asarray(limit, jnp.int32))
        lens = np.asarray(lens)
        self.stats[f"{self.name}_calls"] += int(lens.max())
        self.stats[f"{self.name}_tokens"] += int(lens.sum())
        return np.asarray(steps), lens, np.asarray(logp), cache

    def score(self, steps):
        """steps [m, S] np -> (logp [m] np, cache with m rows)."""
        self.sync()
        logp, cache = self._call(score_steps, (self.lm.graphdef, self.scfg), self.lm.state, self.cache,
                                 self.length, self.pending, jnp.asarray(steps, jnp.int32))
        self.stats[f"{self.name}_calls"] += 1
        self.stats[f"{self.name}_scored_tokens"] += int((np.asarray(steps) >= 0).sum())
        return np.asarray(logp), cache

    def commit(self, cache_rows, row: int, step):
        """Adopt row `row` of a fanned-out cache that holds [pending, step[:-1]] after this context."""
        self.cache = take_row(cache_rows, jnp.asarray(row, jnp.int32))
        self.length = self.length + len(step)
        self.pending = jnp.asarray([step[-1]], jnp.int32)

    def defer(self, step):
        """The other model wrote `step`: read it lazily, before this model is next used."""
        self.unsynced.extend(int(t) for t in step)


def new_stats(names) -> dict:
    stats = {"compile_s": 0.0}
    for name in names:
        stats.update({f"{name}_s": 0.0, f"{name}_calls": 0, f"{name}_tokens": 0, f"{name}_scored_tokens": 0,
                      f"{name}_synced_tokens": 0})
    return stats


def step_reward(reward, prompt, response, steps_so_far, candidates) -> np.ndarray:
    """r(x, y_i) for candidate steps y_i after the response so far: a PRM (with `score_steps`) sees the real step
    boundaries, any other reward sees the response with the candidate appended."""
    m = len(candidates)
    if hasattr(reward, "score_steps"):
        return np.asarray(reward.score_steps([prompt] * m, [steps_so_far + [c] for c in candidates]), np.float64)
    return np.asarray(reward.score([prompt] * m, [response + c for c in candidates]), np.float64)


def gumbel_choice(key, scores, beta) -> int:
    """i ~ softmax(beta * scores) (Gumbel-max); -inf scores are never chosen unless all are."""
    g = np.asarray(jax.random.gumbel(key, (len(scores),), jnp.float32), np.float64)
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores)
    return int(np.argmax(np.where(finite, float(beta) * np.where(finite, scores, 0.0) + g, -np.inf)))


def prompt_setup(small, big, scfg, prompt, max_new_tokens: int, max_step_tokens: int, stats: dict, root, b: int,
                 tags: tuple):
    """Per-prompt state of a step-level loop (GSI, RSD): a decoding context for each model, sized for the whole
    response plus one step, and three PRNG streams (small model, big model, pick) for prompt b, keyed by `tags`."""
    capacity = common.bucket(len(prompt)) + max_new_tokens + max_step_tokens
    s_ctx = Context(small, scfg, prompt, capacity, stats, "small")
    b_ctx = Context(big, scfg, prompt, capacity, stats, "big")
    keys = tuple(jax.random.fold_in(jax.random.fold_in(root, tag), b) for tag in tags)
    return s_ctx, b_ctx, keys

