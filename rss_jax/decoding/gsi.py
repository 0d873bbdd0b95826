"""GSI: Guided Speculative Inference (Geuter, Mroueh, Alvarez-Melis; arXiv 2506.04118; SPEC.md section 5).

Per step: draw n steps from the small model pi_S, score them with the reward and, in one batched teacher-forced pass,
with the big model pi_B; tilt r~_i = r_i + (log pi_B(y_i) - log pi_S(y_i)) / beta; pick i ~ softmax(beta r~); accept
if r~_i >= u, else draw n steps from pi_B and pick j ~ softmax(beta r_j) (soft BoN with the big model). The accept
path samples approximately from pi_B exp(beta r) / Z (self-normalised importance sampling; the error falls like 1/n).
Prompts are decoded one after another (each has its own step loop); the candidates of a step are one batch.
"""
from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from rss_jax.decoding import common, steps as st
from rss_jax.decoding.autoregressive import sampler_config
from rss_jax.decoding.best_of_n import SearchOutput
from rss_jax.rewards import as_reward

SMALL_TAG, BIG_TAG, PICK_TAG = 0x5A11, 0xB16, 0x91C


def has_boxed(tokenizer, response) -> bool:
    return tokenizer is not None and re.search(r"\\boxed\{[^{}]*\}", tokenizer.decode(response)) is not None


def gsi_select(key, rewards, logp_big, logp_small, beta, u):
    """The GSI decision for one step (pure, jittable, vmappable over leading axes via jax.vmap).

    rewards, logp_big, logp_small [n] -> (index int32, accepted bool, tilted rewards [n] float32, effective sample
    size of the tilted weights softmax(beta r~) float32). With logp_big == logp_small the pick is soft BoN on r."""
    r = jnp.asarray(rewards, jnp.float32)
    tilted = r + (jnp.asarray(logp_big, jnp.float32) - jnp.asarray(logp_small, jnp.float32)) / beta
    logits = beta * tilted
    idx = jax.random.categorical(key, logits).astype(jnp.int32)
    w = jax.nn.softmax(logits)
    ess = 1.0 / jnp.sum(w * w)
    return idx, tilted[idx] >= u, tilted, ess


_select = jax.jit(gsi_select)


def gsi(small, big, prompts, reward, n: int = 16, beta: float = 20.0, u: float = 0.5, max_new_tokens: int = 128,
        temperature: float = 0.7, top_k=None, top_p=None, min_p=None, eos=None, seed: int = 0, chat: bool = True,
        max_step_tokens: int = 32, step_end_ids=None, max_steps=None, logprob_temperature=None,
        stop_at_boxed: bool = False) -> SearchOutput:
    """Guided Speculative Inference with small model `small` (pi_S), big model `big` (pi_B), reward `reward`.

    reward: a Reward (a ProcessReward is given the real step boundaries and scores the last step), a callable
    f(prompt_ids, response_ids) or "vader". Steps end at a token whose text contains a blank line, at EOS, or after
    max_step_tokens tokens (`step_end_ids` overrides the blank-line set; without a tokenizer steps are
    max_step_tokens long). logprob_temperature: use softmax(logits / T) for both models' log-probs instead of the
    sampled (tempered, filtered) distributions. stop_at_boxed: end a response once its text holds a complete
    \\boxed{...} answer (needs a tokenizer). Returns SearchOutput (texts, tokens, lengths, scores = the final
    response's reward) with stats: steps, accepted_steps, acceptance_rate, ess_mean, small_tokens, big_tokens,
    big_scored_tokens, wall_s (excluding compiles), s_per_step, compile_s."""
    if small.config.vocab_size != big.config.vocab_size:
        raise ValueError(f"small and big models must share a vocabulary: {small.config.vocab_size} vs "
                         f"{big.config.vocab_size} logits")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    cfg = sampler_config(small, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    scfg = st.StepConfig(cfg, int(max_step_tokens), None if logprob_temperature is None else float(logprob_temperature))
    prompt_ids = common.encode_prompts(small, prompts, chat)
    common.check_context(big, prompt_ids, max_new_tokens, max_step_tokens)
    reward = as_reward(reward, small.tokenizer or big.tokenizer)
    mask = jnp.asarray(st.step_end_mask(small, step_end_ids))
    stats = st.new_stats(("small", "big")) | {"steps": 0, "accepted_steps": 0, "ess": [], "reward_s": 0.0,
                                             "reward_calls": 0}
    t_start = time.perf_counter()
    root = jax.random.key(seed)
    tokens = np.full((len(prompt_ids), max_new_tokens), -1, np.int32)
    final_scores = np.zeros((len(prompt_ids),), np.float32)
    rows = np.arange(n, dtype=np.int32)

    def rewards_of(prompt, response, done_steps, cands):
        t0 = time.perf_counter()
        r = st.step_reward(reward, prompt, response, done_steps, cands)
        stats["reward_s"] += time.perf_counter() - t0
        stats["reward_calls"] += 1
        return r

    for b, prompt in enumerate(prompt_ids):
        s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
            small, big, scfg, prompt, max_new_tokens, max_step_tokens, stats, root, b, (SMALL_TAG, BIG_TAG, PICK_TAG))
        response, done_steps = [], []
        while len(response) < max_new_tokens and (max_steps is None or len(done_steps) < max_steps):
            pos0, limit = len(response), min(max_step_tokens, max_new_tokens - len(response))
            cand, lens, logq, small_rows = s_ctx.generate(n, mask, rows, k_small, pos0, limit)
            cands = [cand[i, : lens[i]].tolist() for i in range(n)]
            r = rewards_of(prompt, response, done_steps, cands)
            logp_big, big_rows = b_ctx.score(cand)
            idx, accepted, _, ess = _select(jax.random.fold_in(k_pick, 2 * pos0), jnp.asarray(r, jnp.float32),
                                            jnp.asarray(logp_big), jnp.asarray(logq), jnp.float32(beta),
                                            jnp.float32(u))
            idx, accepted = int(idx), bool(accepted)
            stats["ess"].append(float(ess))
            stats["steps"] += 1
            if accepted:
                step = cands[idx]
                s_ctx.commit(small_rows, idx, step)
                b_ctx.commit(big_rows, idx, step)
                stats["accepted_steps"] += 1
            else:  # fall back: soft BoN over n steps of the big model, on the raw reward
                cand_b, lens_b, _, big_rows = b_ctx.generate(n, mask, rows, k_big, pos0, limit)
                cands_b = [cand_b[i, : lens_b[i]].tolist() for i in range(n)]
                r_b = rewards_of(prompt, response, done_steps, cands_b)
                j = st.gumbel_choice(jax.random.fold_in(k_pick, 2 * pos0 + 1), r_b, beta)
                step = cands_b[j]
                b_ctx.commit(big_rows, j, step)
                s_ctx.defer(step)
            response += step
            done_steps.append(step)
            if any(t in cfg.eos for t in step) or (stop_at_boxed and has_boxed(small.tokenizer, response)):
                break
        tokens[b, : len(response)] = response
        t0 = time.perf_counter()
        final_scores[b] = reward.score([prompt], [response])[0]
        stats["reward_s"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    ess = stats.pop("ess")
    stats.update(method="gsi", n=int(n), beta=float(beta), u=float(u),
                 acceptance_rate=stats["accepted_steps"] / max(stats["steps"], 1),
                 ess_mean=float(np.mean(ess)) if ess else float("nan"),
                 total_s=total, wall_s=total - stats["compile_s"],
                 s_per_step=(total - stats["compile_s"]) / max(stats["steps"], 1))
    out = common.finish_output(small, tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)},
                        scores=final_scores)
