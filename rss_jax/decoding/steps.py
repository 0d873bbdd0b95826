"""Step-level decoding shared by GSI and RSD: generate candidate steps, score steps under another model, commit one.

A *context* holds B prompts' states in one model: a KV cache with one row per prompt holding every context token but
the last, that last token per row (`pending`, fed by the next forward), the number of cache slots each row uses, and
per prompt the tokens committed by the other model that this one has not read yet (`unsynced`, fed lazily in blocks of
S tokens, for all prompts that need it in one forward, before the model is next used for them).

Every compiled function has static shapes: B prompts x n candidate rows, S = max_step_tokens slots per step. Prompts
that take no part in a call stay in the batch as rows marked done from the start, so a shrinking set of live prompts
never recompiles. A step ends at a token in the step-end mask (a token whose text contains a blank line, or
`step_end_ids`), at EOS, or after S tokens (or the remaining token budget). Log-probabilities are those of the
distribution actually sampled (temperature and filters applied), or of softmax(logits / logprob_temperature) when
that knob is set.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax import sampling
from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import SamplerConfig, prefill, sampler_config
from rss_jax.decoding.best_of_n import SearchOutput
from rss_jax.rewards import as_reward
from rss_jax.models.base import decode_model


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


def gen_step(graphdef, scfg: StepConfig, n: int, state, cache, length, pending, step_end, row_ids, base_keys, pos0,
             limit, done):
    """Sample n candidate steps after each of B contexts. cache: B rows; length, pending [B]; step_end [V] bool; per
    fanned-out row r = b * n + i ([B * n] each): row_ids, base_keys (typed keys), pos0 = generated position of the
    step's first token (keys are row_key(base_keys[r], row_ids[r], pos0[r] + t)), limit = most tokens the step may take
    (<= S), done = rows that sample nothing. Returns (steps [B * n, S] int32 padded with -1, step_len [B * n], logp
    [B * n] the steps' log-probs under the tilt's log-probs, cache with B * n rows)."""
    model = decode_model(graphdef, state)
    s_max = scfg.max_step_tokens
    cache = cache.repeat_rows(n)
    lengths = jnp.repeat(length, n)
    tok = jnp.repeat(pending, n)
    rows = done.shape[0]

    def cond(carry):
        t, _, _, _, _, _, done = carry
        return (t < s_max) & ~jnp.all(done)

    def body(carry):
        t, tok, cache, lengths, steps, logp, done = carry
        logits, cache = model(tok[:, None], cache=cache, lengths=lengths)
        x = scfg.process(logits[:, 0])
        keys = jax.vmap(lambda k, r, p: common.row_key(k, r, p + t))(base_keys, row_ids, pos0)
        if scfg.sampler.temperature == 0:
            new = jnp.argmax(x, axis=-1).astype(jnp.int32)
        else:
            new = jax.vmap(sampling.categorical)(keys, x)
        lp = jnp.take_along_axis(scfg.log_probs(logits[:, 0]), new[:, None], axis=1)[:, 0]
        logp = logp + jnp.where(done, 0.0, lp)
        new = jnp.where(done, -1, new)
        steps = jax.lax.dynamic_update_index_in_dim(steps, new, t, axis=1)
        ended = step_end[jnp.maximum(new, 0)] | common.is_eos(new, scfg.sampler.eos) | (t + 1 >= limit)
        return t + 1, jnp.where(done, tok, new), cache, lengths + 1, steps, logp, done | ended

    init = (jnp.int32(0), tok, cache, lengths, jnp.full((rows, s_max), -1, jnp.int32), jnp.zeros((rows,), jnp.float32),
            done)
    _, _, cache, _, steps, logp, _ = jax.lax.while_loop(cond, body, init)
    return steps, (steps >= 0).sum(axis=1).astype(jnp.int32), logp, cache


def score_steps(graphdef, scfg: StepConfig, state, cache, length, pending, steps):
    """Teacher-force m steps per context ([B * m, S], -1 padded, row b * m + i after context b) in one batched
    forward: each fanned-out cache row receives [pending, step[:-1]]. Returns (logp [B * m] of each step under this
    model, cache with B * m rows)."""
    model = nnx.merge(graphdef, state)
    m = steps.shape[0] // length.shape[0]
    cache = cache.repeat_rows(m)
    inp = jnp.concatenate([jnp.repeat(pending, m)[:, None], jnp.maximum(steps[:, :-1], 0)], axis=1)
    logits, cache = model(inp, cache=cache, lengths=jnp.repeat(length, m))
    lp = jnp.take_along_axis(scfg.log_probs(logits), jnp.maximum(steps, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(steps >= 0, lp, 0.0), axis=1), cache


def prefill_context(graphdef, capacity: int, state, prompt_tokens, prompt_lens):
    model = nnx.merge(graphdef, state)
    _, cache = prefill(model, prompt_tokens, prompt_lens, capacity)
    return cache


def adopt_rows(cache, fanned, rows):
    """Row b of `cache` becomes row rows[b] of the fanned-out cache `fanned` where rows[b] >= 0, else it is kept."""
    picked = fanned.gather_rows(jnp.maximum(rows, 0))
    keep = rows < 0
    return jax.tree.map(lambda old, new: jnp.where(keep.reshape((1, -1) + (1,) * (old.ndim - 2)), old, new),
                        cache, picked)


def _fold_keys(keys, data):
    return jax.vmap(jax.random.fold_in)(keys, data)


fold_keys = jax.jit(_fold_keys)  # [B] typed keys, [B] int -> [B] keys, each fold_in(keys[b], data[b])
_fold_same = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))  # one key, [B] int -> [B] keys


@functools.partial(jax.jit, static_argnums=2)
def _gumbels(keys, data, n: int):
    return jax.vmap(lambda k: jax.random.gumbel(k, (n,), jnp.float32))(_fold_keys(keys, data))


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
    """B prompts' decoding state in one model (host object around device arrays; lengths and pending on the host).

    Methods take `live` [B] bool, the prompts a call is for; the other rows ride along, marked done, and their
    outputs are ignored."""

    def __init__(self, lm, scfg: StepConfig, prompts, capacity: int, stats: dict, name: str):
        self.lm, self.scfg, self.stats, self.name = lm, scfg, stats, name
        self.batch = len(prompts)
        tokens, lens = common.pad_prompts(prompts, common.bucket(max(len(p) for p in prompts)))
        self.cache = self._call(prefill_context, (lm.graphdef, capacity), lm.state, tokens, lens)
        # every prompt token is in the cache; the last one is re-fed as `pending` and overwrites its own slot
        self.length = np.asarray([len(p) - 1 for p in prompts], np.int32)
        self.pending = np.asarray([p[-1] for p in prompts], np.int32)
        self.unsynced: list[list[int]] = [[] for _ in prompts]

    def _call(self, fn, static, *args):
        out, compile_s, run_s = common.COMPILED.call(fn, static, *args)
        self.stats["compile_s"] += compile_s
        self.stats[f"{self.name}_s"] += run_s
        return out

    def sync(self, live):
        """Feed the live prompts' tokens committed by the other model, in blocks of S for all of them at once: a row
        with nothing (more) to read gets an all -1 block and does not advance."""
        s_max = self.scfg.max_step_tokens
        while True:
            todo = [b for b in range(self.batch) if live[b] and self.unsynced[b]]
            if not todo:
                return
            steps = np.full((self.batch, s_max), -1, np.int32)
            for b in todo:
                block, self.unsynced[b] = self.unsynced[b][:s_max], self.unsynced[b][s_max:]
                steps[b, : len(block)] = block
            _, self.cache = self._call(score_steps, (self.lm.graphdef, self.scfg), self.lm.state, self.cache,
                                       jnp.asarray(self.length), jnp.asarray(self.pending), jnp.asarray(steps))
            lens = (steps >= 0).sum(axis=1)
            for b in todo:
                self.length[b] += lens[b]
                self.pending[b] = steps[b, lens[b] - 1]
            self.stats[f"{self.name}_calls"] += 1
            self.stats[f"{self.name}_synced_tokens"] += int(lens.sum())

    def generate(self, n, mask, keys, pos0, limit, live):
        """n candidate steps per live prompt. keys [B] typed keys (row i of prompt b is keyed by row_key(keys[b], i,
        pos0[b] + t)), pos0, limit [B]. -> (steps [B * n, S] np, step_len [B * n] np, logp [B * n] np, cache with B * n
        rows); rows of prompts that are not live are empty."""
        self.sync(live)
        per_row = np.repeat(np.arange(self.batch), n)
        limit = np.clip(np.asarray(limit, np.int32), 1, self.scfg.max_step_tokens)
        steps, lens, logp, cache = self._call(
            gen_step, (self.lm.graphdef, self.scfg, n), self.lm.state, self.cache, jnp.asarray(self.length),
            jnp.asarray(self.pending), mask, jnp.asarray(np.tile(np.arange(n, dtype=np.int32), self.batch)),
            keys[jnp.asarray(per_row)], jnp.asarray(np.asarray(pos0, np.int32)[per_row]), jnp.asarray(limit[per_row]),
            jnp.asarray(~np.asarray(live, bool)[per_row]))
        lens = np.asarray(lens)
        self.stats[f"{self.name}_calls"] += int(lens.max())
        self.stats[f"{self.name}_tokens"] += int(lens.sum())
        return np.asarray(steps), lens, np.asarray(logp), cache

    def score(self, steps, live):
        """steps [B * m, S] np (rows of prompts that are not live should be all -1) -> (logp [B * m] np, cache with
        B * m rows)."""
        self.sync(live)
        steps = np.asarray(steps, np.int32)
        logp, cache = self._call(score_steps, (self.lm.graphdef, self.scfg), self.lm.state, self.cache,
                                 jnp.asarray(self.length), jnp.asarray(self.pending), jnp.asarray(steps))
        self.stats[f"{self.name}_calls"] += 1
        self.stats[f"{self.name}_scored_tokens"] += int((steps >= 0).sum())
        return np.asarray(logp), cache

    def commit(self, fanned, picks: dict):
        """picks {prompt b: (row, step)}: prompt b adopts row `row` of a fanned-out cache that holds [pending,
        step[:-1]] after its context; the other prompts keep their state."""
        if not picks:
            return
        rows = np.full((self.batch,), -1, np.int32)
        for b, (row, step) in picks.items():
            rows[b] = row
            self.length[b] += len(step)
            self.pending[b] = step[-1]
        self.cache = self._call(adopt_rows, (), self.cache, fanned, jnp.asarray(rows))

    def defer(self, b: int, step):
        """The other model wrote `step` for prompt b: read it lazily, before this model is next used for b."""
        self.unsynced[b].extend(int(t) for t in step)


def new_stats(names) -> dict:
    stats = {"compile_s": 0.0, "rounds": 0, "steps": 0, "accepted_steps": 0, "reward_s": 0.0, "reward_calls": 0,
             "reward_tokens": 0}
    for name in names:
        stats.update({f"{name}_s": 0.0, f"{name}_calls": 0, f"{name}_tokens": 0, f"{name}_scored_tokens": 0,
                      f"{name}_synced_tokens": 0})
    return stats


def step_rewards(reward, items, stats: dict) -> list:
    """r(x, y_i) for the candidate steps of several prompts in one reward call. items: [(prompt, response so far,
    steps so far, candidates)]. A PRM (with `score_steps`) sees the real step boundaries, any other reward the response
    with the candidate appended. Returns one float64 array per item."""
    prompts, rows, sizes = [], [], []
    prm = hasattr(reward, "score_steps")
    for prompt, response, steps_so_far, cands in items:
        prompts += [prompt] * len(cands)
        rows += [steps_so_far + [c] for c in cands] if prm else [response + c for c in cands]
        sizes.append(len(cands))
        stats["reward_tokens"] += sum(len(prompt) + len(response) + len(c) for c in cands)
    if not rows:
        return []
    t0 = time.perf_counter()
    r = np.asarray(reward.score_steps(prompts, rows) if prm else reward.score(prompts, rows), np.float64)
    stats["reward_s"] += time.perf_counter() - t0
    stats["reward_calls"] += 1
    return np.split(r, np.cumsum(sizes)[:-1])


def final_rewards(reward, prompts, responses, stats: dict) -> np.ndarray:
    """Every prompt's final response scored in one reward call -> [B] float32."""
    t0 = time.perf_counter()
    out = np.asarray(reward.score(prompts, responses), np.float32)
    stats["reward_s"] += time.perf_counter() - t0
    stats["reward_calls"] += 1
    stats["reward_tokens"] += sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return out


def gumbel_choices(keys, data, scores, beta) -> np.ndarray:
    """i_b ~ softmax(beta * scores[b]) (Gumbel-max) for every prompt b, with key fold_in(keys[b], data[b]); -inf
    scores are never chosen unless all of a row's are. keys [B], data [B], scores [B, n] -> [B] int."""
    scores = np.asarray(scores, np.float64)
    g = np.asarray(_gumbels(keys, jnp.asarray(np.asarray(data, np.int32)), scores.shape[1]), np.float64)
    finite = np.isfinite(scores)
    return np.argmax(np.where(finite, float(beta) * np.where(finite, scores, 0.0) + g, -np.inf), axis=1)


def prompt_keys(root, tag: int, prompt_offset: int, batch: int):
    """[B] typed keys fold_in(fold_in(root, tag), prompt_offset + b): a prompt's stream depends on its index only."""
    idx = jnp.arange(prompt_offset, prompt_offset + batch, dtype=jnp.uint32)
    return _fold_same(jax.random.fold_in(root, tag), idx)


def prompt_setup(small, big, scfg, prompts, max_new_tokens: int, max_step_tokens: int, stats: dict, root,
                 prompt_offset: int, tags: tuple):
    """The state of a step-level loop (GSI, RSD) over B prompts: a decoding context in each model, sized for the
    longest response plus one step, and three PRNG key streams [B] (small model, big model, pick) keyed by `tags`;
    prompt b's streams use index prompt_offset + b."""
    capacity = common.bucket(max(len(p) for p in prompts)) + max_new_tokens + max_step_tokens
    s_ctx = Context(small, scfg, prompts, capacity, stats, "small")
    b_ctx = Context(big, scfg, prompts, capacity, stats, "big")
    keys = tuple(prompt_keys(root, tag, prompt_offset, len(prompts)) for tag in tags)
    return s_ctx, b_ctx, keys


@dataclasses.dataclass
class StepSearch:
    """What GSI and RSD share around their step rule: validated set-up, per-prompt responses and steps, the end of
    a round (commit each prompt's step, retire finished prompts) and the SearchOutput."""
    cfg: SamplerConfig
    scfg: StepConfig
    prompt_ids: list
    reward: object
    mask: jax.Array
    stats: dict
    max_steps: int | None
    t_start: float
    responses: list = dataclasses.field(default_factory=list)  # per prompt: the tokens so far
    done_steps: list = dataclasses.field(default_factory=list)  # per prompt: the committed steps
    active: np.ndarray | None = None  # [B] bool: prompts still decoding

    @classmethod
    def start(cls, small, big, prompts, reward, n, max_new_tokens, temperature, top_k, top_p, min_p, eos, chat,
              max_step_tokens, step_end_ids, max_steps, prompt_offset, logprob_temperature=None):
        if small.config.vocab_size != big.config.vocab_size:
            raise ValueError(f"small and big models must share a vocabulary: {small.config.vocab_size} vs "
                             f"{big.config.vocab_size} logits")
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(prompt_offset, (int, np.integer)) or prompt_offset < 0:
            raise ValueError(f"prompt_offset must be an integer >= 0, got {prompt_offset!r}")
        cfg = sampler_config(small, max_new_tokens, temperature, top_k, top_p, min_p, eos)
        scfg = StepConfig(cfg, int(max_step_tokens), None if logprob_temperature is None else float(logprob_temperature))
        prompt_ids = common.encode_prompts(small, prompts, chat)
        common.check_context(big, prompt_ids, max_new_tokens, max_step_tokens)
        return cls(cfg, scfg, prompt_ids, as_reward(reward, small.tokenizer or big.tokenizer),
                   jnp.asarray(step_end_mask(small, step_end_ids)), new_stats(("small", "big")), max_steps,
                   time.perf_counter(), [[] for _ in prompt_ids], [[] for _ in prompt_ids],
                   np.full((len(prompt_ids),), max_steps is None or max_steps > 0))

    def round(self):
        """-> (live prompt indices, pos0 [B], limit [B]) of a new round."""
        self.stats["rounds"] += 1
        pos0 = np.asarray([len(r) for r in self.responses], np.int32)
        return np.flatnonzero(self.active), pos0, np.minimum(self.scfg.max_step_tokens, self.cfg.max_new_tokens - pos0)

    def rewards(self, cands: dict, n: int, dtype=np.float64) -> np.ndarray:
        """cands {b: n candidate steps} -> [B, n] rewards (0 for the other prompts), one reward call."""
        r = np.zeros((len(self.prompt_ids), n), dtype)
        live = list(cands)
        r[live] = step_rewards(self.reward, [(self.prompt_ids[b], self.responses[b], self.done_steps[b], cands[b])
                                             for b in live], self.stats)
        return r

    def advance(self, chosen: dict, stop=None):
        """chosen {b: step}: append each step; a prompt finishes at EOS, the token budget, max_steps or stop(b)."""
        for b, step in chosen.items():
            self.responses[b] += step
            self.done_steps[b].append(step)
            if (any(t in self.cfg.eos for t in step) or len(self.responses[b]) >= self.cfg.max_new_tokens
                    or (self.max_steps is not None and len(self.done_steps[b]) >= self.max_steps)
                    or (stop is not None and stop(b))):
                self.active[b] = False

    def finish(self, small, **method_stats):
        """Score the final responses (one call) -> SearchOutput with the stats every step-level method reports."""
        tokens = np.full((len(self.prompt_ids), self.cfg.max_new_tokens), -1, np.int32)
        for b, resp in enumerate(self.responses):
            tokens[b, : len(resp)] = resp
        scores = final_rewards(self.reward, self.prompt_ids, self.responses, self.stats)
        st = self.stats
        total = time.perf_counter() - self.t_start
        st.update(method_stats)
        st.update(acceptance_rate=st["accepted_steps"] / max(st["steps"], 1), small_forwards=st["small_calls"],
                  target_forwards=st["big_calls"], tokens_generated=int((tokens >= 0).sum()), total_s=total,
                  wall_s=total - st["compile_s"], s_per_step=(total - st["compile_s"]) / max(st["steps"], 1))
        out = common.finish_output(small, tokens, self.prompt_ids, st)
        return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, scores=scores)


def candidate_steps(steps, lens, n: int, prompts) -> dict:
    """Rows b * n + i of a generation -> {b: [n candidate steps as lists]} for the prompts asked for."""
    return {b: [steps[b * n + i, : lens[b * n + i]].tolist() for i in range(n)] for b in prompts}
