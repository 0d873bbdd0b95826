"""GSI: Guided Speculative Inference (Geuter, Mroueh, Alvarez-Melis; arXiv 2506.04118; SPEC.md section 5).

Per step: draw n steps from the small model pi_S, score them with the reward and, in one batched teacher-forced pass,
with the big model pi_B; tilt r~_i = r_i + (log pi_B(y_i) - log pi_S(y_i)) / beta; pick i ~ softmax(beta r~); accept
if r~_i >= u, else draw n steps from pi_B and pick j ~ softmax(beta r_j) (soft BoN with the big model). The accept
path samples approximately from pi_B exp(beta r) / Z (self-normalised importance sampling; the error falls like 1/n).
All prompts of a call advance together, one step each per round: a round makes one small-model generation call
for every live prompt's n candidates, one big-model scoring call, one reward call, and, when some prompts fall back,
one big-model generation call for those; finished prompts stay in the batch as idle rows.
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


_select = jax.jit(jax.vmap(gsi_select, in_axes=(0, 0, 0, 0, None, None)))


def gsi(small, big, prompts, reward, n: int = 16, beta: float = 20.0, u: float = 0.5, max_new_tokens: int = 128,
        temperature: float = 0.7, top_k=None, top_p=None, min_p=None, eos=None, seed: int = 0, chat: bool = True,
        max_step_tokens: int = 32, step_end_ids=None, max_steps=None, logprob_temperature=None,
        stop_at_boxed: bool = False, prompt_offset: int = 0) -> SearchOutput:
    """Guided Speculative Inference with small model `small` (pi_S), big model `big` (pi_B), reward `reward`.

    reward: a Reward (a ProcessReward is given the real step boundaries and scores the last step), a callable
    f(prompt_ids, response_ids) or "vader". Steps end at a token whose text contains a blank line, at EOS, or after
    max_step_tokens tokens (`step_end_ids` overrides the blank-line set; without a tokenizer steps are
    max_step_tokens long). logprob_temperature: use softmax(logits / T) for both models' log-probs instead of the
    sampled (tempered, filtered) distributions. stop_at_boxed: end a response once its text holds a complete
    \\boxed{...} answer (needs a tokenizer). prompt_offset: prompt b's random streams are those of index
    prompt_offset + b, so a long prompt list decoded in chunks (each chunk with offset = its start) gives the same
    responses as one call. Every prompt's response equals that of a call with that prompt alone (and prompt_offset =
    its index): batching changes only the speed.

    Returns SearchOutput (texts, tokens, lengths, scores = the final response's reward) with stats summed over
    prompts: steps, accepted_steps, acceptance_rate (accepted_steps / steps), ess_mean, small_tokens, big_tokens,
    big_scored_tokens (real tokens of live rows), small_calls / small_forwards and big_calls / target_forwards
    (batched forwards: a generation counts its decode steps, a scoring or sync pass 1), rounds (host steps),
    reward_calls, reward_tokens (prompt + response tokens of every scored row, the final scoring included),
    tokens_generated, wall_s (excluding compiles), s_per_step, compile_s."""
    if small.config.vocab_size != big.config.vocab_size:
        raise ValueError(f"small and big models must share a vocabulary: {small.config.vocab_size} vs "
                         f"{big.config.vocab_size} logits")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not isinstance(prompt_offset, (int, np.integer)) or prompt_offset < 0:
        raise ValueError(f"prompt_offset must be an integer >= 0, got {prompt_offset!r}")
    n = int(n)
    cfg = sampler_config(small, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    scfg = st.StepConfig(cfg, int(max_step_tokens), None if logprob_temperature is None else float(logprob_temperature))
    prompt_ids = common.encode_prompts(small, prompts, chat)
    common.check_context(big, prompt_ids, max_new_tokens, max_step_tokens)
    reward = as_reward(reward, small.tokenizer or big.tokenizer)
    mask = jnp.asarray(st.step_end_mask(small, step_end_ids))
    stats = st.new_stats(("small", "big"))
    ess_all = []
    t_start = time.perf_counter()
    n_prompts = len(prompt_ids)
    s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
        small, big, scfg, prompt_ids, max_new_tokens, max_step_tokens, stats, jax.random.key(seed),
        int(prompt_offset), (SMALL_TAG, BIG_TAG, PICK_TAG))
    responses = [[] for _ in prompt_ids]
    done_steps = [[] for _ in prompt_ids]
    active = np.full((n_prompts,), max_steps is None or max_steps > 0)

    def candidates(steps, lens, b):
        return [steps[b * n + i, : lens[b * n + i]].tolist() for i in range(n)]

    while active.any():
        live = np.flatnonzero(active)
        stats["rounds"] += 1
        pos0 = np.asarray([len(r) for r in responses], np.int32)
        limit = np.minimum(max_step_tokens, max_new_tokens - pos0)
        cand, lens, logq, small_rows = s_ctx.generate(n, mask, k_small, pos0, limit, active)
        cands = {b: candidates(cand, lens, b) for b in live}
        r = np.zeros((n_prompts, n), np.float32)
        r[live] = st.step_rewards(reward, [(prompt_ids[b], responses[b], done_steps[b], cands[b]) for b in live],
                                  stats)
        logp_big, big_rows = b_ctx.score(cand, active)
        idx, accepted, _, ess = _select(st.fold_keys(k_pick, jnp.asarray(2 * pos0)), jnp.asarray(r),
                                        jnp.asarray(logp_big.reshape(n_prompts, n)),
                                        jnp.asarray(logq.reshape(n_prompts, n)), jnp.float32(beta), jnp.float32(u))
        idx, accepted, ess = np.asarray(idx), np.asarray(accepted), np.asarray(ess)
        stats["steps"] += len(live)
        ess_all += [float(ess[b]) for b in live]
        chosen = {b: cands[b][idx[b]] for b in live if accepted[b]}
        picks = {b: (b * n + int(idx[b]), step) for b, step in chosen.items()}
        s_ctx.commit(small_rows, picks)
        b_ctx.commit(big_rows, picks)
        stats["accepted_steps"] += len(chosen)
        fall = active & ~accepted
        if fall.any():  # soft BoN over n steps of the big model, on the raw reward
            cand_b, lens_b, _, big_gen = b_ctx.generate(n, mask, k_big, pos0, limit, fall)
            fb = np.flatnonzero(fall)
            cands_b = {b: candidates(cand_b, lens_b, b) for b in fb}
            r_b = np.zeros((n_prompts, n), np.float64)
            r_b[fb] = st.step_rewards(reward, [(prompt_ids[b], responses[b], done_steps[b], cands_b[b]) for b in fb],
                                      stats)
            j = st.gumbel_choices(k_pick, 2 * pos0 + 1, r_b, beta)
            fell = {b: cands_b[b][j[b]] for b in fb}
            b_ctx.commit(big_gen, {b: (b * n + int(j[b]), step) for b, step in fell.items()})
            for b, step in fell.items():
                s_ctx.defer(b, step)
            chosen |= fell
        for b, step in chosen.items():
            responses[b] += step
            done_steps[b].append(step)
            if (any(t in cfg.eos for t in step) or len(responses[b]) >= max_new_tokens
                    or (max_steps is not None and len(done_steps[b]) >= max_steps)
                    or (stop_at_boxed and has_boxed(small.tokenizer, responses[b]))):
                active[b] = False
    tokens = np.full((n_prompts, max_new_tokens), -1, np.int32)
    for b, resp in enumerate(responses):
        tokens[b, : len(resp)] = resp
    final_scores = st.final_rewards(reward, prompt_ids, responses, stats)
    total = time.perf_counter() - t_start
    stats.update(method="gsi", n=n, beta=float(beta), u=float(u),
                 acceptance_rate=stats["accepted_steps"] / max(stats["steps"], 1),
                 ess_mean=float(np.mean(ess_all)) if ess_all else float("nan"),
                 small_forwards=stats["small_calls"], target_forwards=stats["big_calls"],
                 tokens_generated=int((tokens >= 0).sum()),
                 total_s=total, wall_s=total - stats["compile_s"],
                 s_per_step=(total - stats["compile_s"]) / max(stats["steps"], 1))
    out = common.finish_output(small, tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)},
                        scores=final_scores)
