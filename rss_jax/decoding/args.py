"""ARGS: reward-guided token-level search (Khanov et al., ICLR 2024).

At every generated position the target's raw logits l give the k most likely tokens; each candidate v is scored
s(v) = l(v) + w * r(x, y_<t, v), the reward of the prefix extended by v. Greedy ARGS takes argmax s (ties to the
candidate with the larger logit), stochastic ARGS samples v ~ softmax(s / tau) over the k candidates.

Two reward paths, one law:
* a JAX reward model (`rewards.ModelReward` over the target's vocabulary) keeps its own KV cache of the prefix.
  The k candidates are one cached step of k rows that share the prefix cache; the chosen row's cache is kept, so
  the prefix is never read twice. The whole response is one compiled `lax.while_loop`.
* any other reward (a host function such as VADER) is called once per position on the k candidate responses of
  every prompt; the target side stays one compiled step per position.
Keys: the stochastic choice of row b at position t uses `row_key(seed, prompt_offset + b, t)`.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.cache import init_cache
from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import prefill, row_keys
from rss_jax.decoding.best_of_n import SearchOutput
from rss_jax.rewards import ModelReward, as_reward
from rss_jax.models.base import compute_dtype, decode_model

@dataclasses.dataclass(frozen=True)
class ArgsConfig:
    """Static knobs of the ARGS loop."""
    max_new_tokens: int
    k: int
    weight: float
    greedy: bool
    tau: float
    eos: tuple
    vocab: int  # candidates come from the first `vocab` logits (the tokenizer's ids)


def top_candidates(cfg: ArgsConfig, logits):
    """logits [B, V] -> (raw logits [B, k] float32, ids [B, k] int32), largest first (ties to the lower id)."""
    vals, ids = jax.lax.top_k(jnp.asarray(logits[:, : cfg.vocab], jnp.float32), cfg.k)
    return vals, ids.astype(jnp.int32)


def choose(cfg: ArgsConfig, keys, logit_vals, rewards):
    """The ARGS decision: keys [B], logit_vals, rewards [B, k] -> chosen slot [B] int32."""
    s = logit_vals + cfg.weight * rewards
    if cfg.greedy:
        return jnp.argmax(s, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda key, x: jax.random.categorical(key, x / cfg.tau))(keys, s).astype(jnp.int32)


def _rm_step(rm, tokens, cache, lengths):
    """One cached reward-model step: tokens [R] -> (score [R] at that token, cache)."""
    h, cache = rm.backbone(tokens[:, None], cache=cache, lengths=lengths, return_hidden=True)
    return rm.head(h)[:, 0, 0].astype(jnp.float32), cache


def args_cached_loop(graphdef, rm_graphdef, cfg: ArgsConfig, state, rm_state, prompt_tokens, prompt_lens, row_ids,
                     base_key):
    """The whole ARGS response with a cached reward model, as one while_loop.

    Returns (tokens [B, N] -1 padded, candidate ids [B, N, k], candidate rewards [B, N, k], steps run)."""
    model, rm = decode_model(graphdef, state), decode_model(rm_graphdef, rm_state)
    b, p = prompt_tokens.shape
    n, k = cfg.max_new_tokens, cfg.k
    last, cache = prefill(model, prompt_tokens, prompt_lens, p + n + 1)
    dtype = compute_dtype(rm_state)
    rm_cache = init_cache(rm.backbone.config, b, p + n + 1, dtype)
    # the whole prompt goes into the reward model's cache; each step scores its k candidates as one cached step
    _, rm_cache = rm.backbone(prompt_tokens, cache=rm_cache, lengths=jnp.zeros((b,), jnp.int32), return_hidden=True)
    lengths = prompt_lens
    rm_lengths = prompt_lens  # slots 0..P-1 hold the prompt; candidates are written at slot P + t
    out = jnp.full((b, n), -1, jnp.int32)
    cand_ids = jnp.zeros((b, n, k), jnp.int32)
    cand_r = jnp.zeros((b, n, k), jnp.float32)
    rows = jnp.arange(b)

    def cond(carry):
        t, _, _, _, _, _, _, _, _, done = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, last, cache, lengths, rm_cache, rm_lengths, out, cand_ids, cand_r, done = carry
        vals, ids = top_candidates(cfg, last)
        r, rm_rows = _rm_step(rm, ids.reshape(-1), rm_cache.repeat_rows(k), jnp.repeat(rm_lengths, k))
        r = r.reshape(b, k)
        slot = choose(cfg, row_keys(base_key, row_ids, t), vals, r)
        new = jnp.where(done, -1, ids[rows, slot])
        out = out.at[:, t].set(new)
        cand_ids = cand_ids.at[:, t].set(ids)
        cand_r = cand_r.at[:, t].set(r)
        rm_cache = rm_rows.gather_rows(rows * k + slot)
        logits, cache = model(jnp.maximum(new, 0)[:, None], cache=cache, lengths=lengths)
        step = (~done).astype(jnp.int32)
        done = done | common.is_eos(new, cfg.eos) | (t + 1 >= n)
        return (t + 1, logits[:, 0], cache, lengths + step, rm_cache, rm_lengths + step, out, cand_ids, cand_r,
                done)

    init = (jnp.int32(0), last, cache, lengths, rm_cache, rm_lengths, out, cand_ids, cand_r, jnp.zeros((b,), bool))
    t, _, _, _, _, _, out, cand_ids, cand_r, _ = jax.lax.while_loop(cond, body, init)
    return out, cand_ids, cand_r, t


def args_start(graphdef, cfg: ArgsConfig, state, prompt_tokens, prompt_lens):
    """Host-reward path, position 0: prefill -> (candidate logits [B, k], ids [B, k], cache)."""
    model = nnx.merge(graphdef, state)
    last, cache = prefill(model, prompt_tokens, prompt_lens, prompt_tokens.shape[1] + cfg.max_new_tokens + 1)
    vals, ids = top_candidates(cfg, last)
    return vals, ids, cache


def args_next(graphdef, cfg: ArgsConfig, state, cache, lengths, vals, ids, rewards, done, row_ids, base_key, t):
    """Host-reward path, one position: choose among the candidates, feed the chosen token, give the next
    candidates. -> (chosen token [B] (-1 for done rows), next vals, next ids, cache)."""
    model = nnx.merge(graphdef, state)
    slot = choose(cfg, row_keys(base_key, row_ids, t), vals, rewards)
    new = jnp.where(done, -1, jnp.take_along_axis(ids, slot[:, None], axis=1)[:, 0])
    logits, cache = model(jnp.maximum(new, 0)[:, None], cache=cache, lengths=lengths)
    vals, ids = top_candidates(cfg, logits[:, 0])
    return new, vals, ids, cache


def args(lm, prompts, reward, k=None, weight: float = 1.5, greedy=None, tau: float = 0.7, mode: str = "paper",
         max_new_tokens: int = 128, eos=None, seed: int = 0, chat: bool = True, prompt_offset: int = 0,
         return_trace: bool = False) -> SearchOutput:
    """ARGS decoding of `lm` guided by `reward`.

    reward: a `rewards.ModelReward` over lm's vocabulary (scored from its own KV cache, the whole loop compiled), or
    any other Reward, callable f(prompt_ids, response_ids) or "vader" (called once per position on the k candidate
    responses of every unfinished prompt). k: candidates per position (default 10; 40 in authors_code). weight: w
    in s = logit + w * r. greedy: argmax s (default) or v ~ softmax(s / tau). mode "paper" stops at EOS;
    "authors_code" is the released evaluation: greedy, k = 40, no EOS stop. Knobs left None take the mode's value.
    prompt_offset: prompt b uses keys of index prompt_offset + b (chunks of a long list give the same results).

    Returns SearchOutput: texts, tokens, lengths, scores (the reward of each returned response), stats:
    target_forwards (the prefill + one per position), small_forwards (0), reward_calls (batched calls; the cached
    path adds the prompt pass), reward_rows, reward_tokens (tokens the reward model read), tokens_generated,
    wall_s (compiles and the final scoring excluded), compile_s. return_trace adds stats["trace"]: candidate ids
    and rewards [B, N, k] (cached path only).
    """
    common.check_search_mode(mode)
    authors = mode == "authors_code"
    k = (40 if authors else 10) if k is None else k
    greedy = True if greedy is None else bool(greedy)
    if authors and not greedy:
        raise ValueError("mode='authors_code' is greedy ARGS (the released code has no sampling); "
                         "use mode='paper' for greedy=False")
    if authors:
        eos = []
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not greedy and not tau > 0:
        raise ValueError(f"tau must be > 0 for stochastic ARGS, got {tau!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    vocab = min(lm.vocab_size, lm.config.vocab_size)
    if k > vocab:
        raise ValueError(f"k={k} candidates exceed the vocabulary of {vocab} tokens")
    cfg = ArgsConfig(max_new_tokens, int(k), float(weight), greedy, float(tau), common.resolve_eos(lm, eos), vocab)
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    common.check_context(lm, prompt_ids, max_new_tokens, 1)
    reward = as_reward(reward, lm.tokenizer)
    t_start = time.perf_counter()
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    row_ids = jnp.arange(prompt_offset, prompt_offset + len(prompt_ids), dtype=jnp.int32)
    base_key = jax.random.key(seed)
    stats = {"method": "args", "mode": mode, "k": cfg.k, "weight": cfg.weight, "greedy": greedy,
             "compile_s": 0.0, "reward_s": 0.0}
    if isinstance(reward, ModelReward):
        out, stats_run = _run_cached(lm, reward, cfg, tokens, lens, row_ids, base_key, prompt_ids, return_trace)
    else:
        out, stats_run = _run_host(lm, reward, cfg, tokens, lens, row_ids, base_key, prompt_ids)
    stats.update(stats_run)
    out_tokens = np.asarray(out)
    lengths = (out_tokens >= 0).sum(axis=1)
    responses = [row[:n].tolist() for row, n in zip(out_tokens, lengths)]
    t0 = time.perf_counter()
    scores = np.asarray(reward.score(prompt_ids, responses), np.float32)
    score_s = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    stats.update(small_forwards=0, tokens_generated=int(lengths.sum()), total_s=total,
                 wall_s=total - stats["compile_s"] - score_s)
    res = common.finish_output(lm, out_tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)}, scores=scores)


def _run_cached(lm, reward: ModelReward, cfg, tokens, lens, row_ids, base_key, prompt_ids, return_trace):
    if reward.config.vocab_size < cfg.vocab:
        raise ValueError(f"the reward model reads {reward.config.vocab_size} token ids but the model's candidates "
                         f"range over {cfg.vocab}: a cached reward model must share the model's tokenizer; wrap a "
                         "reward with its own tokenizer in a rewards.TextReward instead")
    (out, cand_ids, cand_r, steps), compile_s, run_s = common.COMPILED.call(
        args_cached_loop, (lm.graphdef, reward.graphdef, cfg), lm.state, reward.state, tokens, lens, row_ids,
        base_key)
    steps = int(steps)
    b = len(prompt_ids)
    run = {"compile_s": compile_s, "steps": steps, "target_forwards": 1 + steps,  # prefill + one per position
           # one prompt pass, then one batched call of k one-token rows per position
           "reward_calls": 1 + steps, "reward_rows": b + steps * b * cfg.k,
           "reward_tokens": sum(len(p) for p in prompt_ids) + steps * b * cfg.k}
    if return_trace:
        run["trace"] = {"candidates": np.asarray(cand_ids), "rewards": np.asarray(cand_r)}
    return np.asarray(out), run


def _run_host(lm, reward, cfg, tokens, lens, row_ids, base_key, prompt_ids):
    b, n, k = len(prompt_ids), cfg.max_new_tokens, cfg.k
    (vals, ids, cache), compile_s, run_s = common.COMPILED.call(args_start, (lm.graphdef, cfg), lm.state, tokens,
                                                                 lens)
    lengths = lens
    out = np.full((b, n), -1, np.int32)
    done = np.zeros((b,), bool)
    run = {"compile_s": compile_s, "target_forwards": 1, "reward_calls": 0, "reward_rows": 0, "reward_tokens": 0}
    reward_s = 0.0
    t = 0
    for t in range(n):
        ids_np = np.asarray(ids)
        live = np.flatnonzero(~done)
        r = np.zeros((b, k), np.float32)
        t0 = time.perf_counter()
        prm = [prompt_ids[i] for i in live for _ in range(k)]
        resp = [out[i, :t].tolist() + [int(v)] for i in live for v in ids_np[i]]
        r[live] = np.asarray(reward.score(prm, resp), np.float32).reshape(len(live), k)
        reward_s += time.perf_counter() - t0
        run["reward_calls"] += 1
        run["reward_rows"] += len(resp)
        run["reward_tokens"] += sum(len(p) + len(x) for p, x in zip(prm, resp))
        (new, vals, ids, cache), c_s, _ = common.COMPILED.call(
            args_next, (lm.graphdef, cfg), lm.state, cache, lengths, vals, ids, jnp.asarray(r), jnp.asarray(done),
            row_ids, base_key, jnp.asarray(t, jnp.int32))
        run["compile_s"] += c_s
        new = np.asarray(new)
        out[:, t] = new
        lengths = lengths + jnp.asarray(~done, jnp.int32)
        done = done | np.isin(new, cfg.eos)
        run["target_forwards"] += 1
        if done.all():
            break
    run["steps"] = t + 1
    run["reward_s"] = reward_s
    return out, run
