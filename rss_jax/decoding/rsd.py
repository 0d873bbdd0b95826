"""RSD: Reward-Guided Speculative Decoding (Liao et al., ICML 2025, arXiv 2501.19324; SPEC.md section 6).

Per step: draft one step with the small model, score it with a (process) reward model, keep it if r >= delta, else
regenerate the step with the big model. The law is the mixture omega(r) P_small + nu P_big with omega(r) = 1[r >= delta]
and nu the rejection probability. With n > 1 (the best-of-n variant GSI uses as a baseline) n drafts are drawn and
one is picked by soft BoN on the raw reward (i ~ softmax(beta r)) before the threshold. The big model reads accepted
steps lazily, in one block per max_step_tokens tokens, just before it next writes a step. All prompts of a call
advance together, one step each per round: one small-model generation call for every live prompt's drafts, one
reward call, and one big-model generation call for the prompts whose draft was rejected.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rss_jax.decoding import common, steps as st
from rss_jax.decoding.autoregressive import sampler_config
from rss_jax.decoding.best_of_n import SearchOutput
from rss_jax.rewards import as_reward

SMALL_TAG, BIG_TAG, PICK_TAG = 0x25D1, 0x25D2, 0x25D3


def rsd(small, big, prompts, reward, delta: float = 0.7, n: int = 1, beta: float = 20.0, max_new_tokens: int = 128,
        temperature: float = 0.7, top_k=None, top_p=None, min_p=None, eos=None, seed: int = 0, chat: bool = True,
        max_step_tokens: int = 32, step_end_ids=None, max_steps=None, prompt_offset: int = 0) -> SearchOutput:
    """Reward-guided speculative decoding: `small` drafts each step, `reward` (a ProcessReward scores the last step
    with the real step boundaries; any Reward or callable f(prompt_ids, response_ids) works) judges it against
    `delta`, `big` rewrites rejected steps. Step ends as in `gsi`. prompt_offset: prompt b's random streams are those
    of index prompt_offset + b (as in `gsi`: chunked calls give the same responses as one call, and each prompt's
    response equals that of a call with that prompt alone).

    Returns SearchOutput (scores = the final response's reward) with stats summed over prompts: steps,
    accepted_steps, acceptance_rate (steps), token_acceptance_rate (tokens of accepted steps / all tokens),
    small_tokens, big_tokens, big_synced_tokens, small_calls / small_forwards and big_calls / target_forwards (batched
    forwards), rounds, reward_calls, reward_tokens, tokens_generated, wall_s (excluding compiles)."""
    if small.config.vocab_size != big.config.vocab_size:
        raise ValueError(f"small and big models must share a vocabulary: {small.config.vocab_size} vs "
                         f"{big.config.vocab_size} logits")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(prompt_offset, (int, np.integer)) or prompt_offset < 0:
        raise ValueError(f"prompt_offset must be an integer >= 0, got {prompt_offset!r}")
    n = int(n)
    cfg = sampler_config(small, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    scfg = st.StepConfig(cfg, int(max_step_tokens))
    prompt_ids = common.encode_prompts(small, prompts, chat)
    common.check_context(big, prompt_ids, max_new_tokens, max_step_tokens)
    reward = as_reward(reward, small.tokenizer or big.tokenizer)
    mask = jnp.asarray(st.step_end_mask(small, step_end_ids))
    stats = st.new_stats(("small", "big")) | {"accepted_tokens": 0}
    t_start = time.perf_counter()
    n_prompts = len(prompt_ids)
    s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
        small, big, scfg, prompt_ids, max_new_tokens, max_step_tokens, stats, jax.random.key(seed),
        int(prompt_offset), (SMALL_TAG, BIG_TAG, PICK_TAG))
    responses = [[] for _ in prompt_ids]
    done_steps = [[] for _ in prompt_ids]
    active = np.full((n_prompts,), max_steps is None or max_steps > 0)
    while active.any():
        live = np.flatnonzero(active)
        stats["rounds"] += 1
        pos0 = np.asarray([len(r) for r in responses], np.int32)
        limit = np.minimum(max_step_tokens, max_new_tokens - pos0)
        cand, lens, _, small_rows = s_ctx.generate(n, mask, k_small, pos0, limit, active)
        cands = {b: [cand[b * n + i, : lens[b * n + i]].tolist() for i in range(n)] for b in live}
        r = np.zeros((n_prompts, n), np.float64)
        r[live] = st.step_rewards(reward, [(prompt_ids[b], responses[b], done_steps[b], cands[b]) for b in live],
                                  stats)
        idx = np.zeros((n_prompts,), np.int64) if n == 1 else st.gumbel_choices(k_pick, pos0, r, beta)
        stats["steps"] += len(live)
        chosen = {b: cands[b][idx[b]] for b in live if r[b, idx[b]] >= delta}
        s_ctx.commit(small_rows, {b: (b * n + int(idx[b]), step) for b, step in chosen.items()})
        for b, step in chosen.items():
            b_ctx.defer(b, step)
        stats["accepted_steps"] += len(chosen)
        stats["accepted_tokens"] += sum(len(step) for step in chosen.values())
        fall = active.copy()
        fall[list(chosen)] = False
        if fall.any():
            cand_b, lens_b, _, big_rows = b_ctx.generate(1, mask, k_big, pos0, limit, fall)
            fell = {b: cand_b[b, : lens_b[b]].tolist() for b in np.flatnonzero(fall)}
            b_ctx.commit(big_rows, {b: (b, step) for b, step in fell.items()})
            for b, step in fell.items():
                s_ctx.defer(b, step)
            chosen |= fell
        for b, step in chosen.items():
            responses[b] += step
            done_steps[b].append(step)
            if (any(t in cfg.eos for t in step) or len(responses[b]) >= max_new_tokens
                    or (max_steps is not None and len(done_steps[b]) >= max_steps)):
                active[b] = False
    tokens = np.full((n_prompts, max_new_tokens), -1, np.int32)
    for b, resp in enumerate(responses):
        tokens[b, : len(resp)] = resp
    final_scores = st.final_rewards(reward, prompt_ids, responses, stats)
    total = time.perf_counter() - t_start
    n_tokens = int((tokens >= 0).sum())
    stats.update(method="rsd", n=n, delta=float(delta),
                 acceptance_rate=stats["accepted_steps"] / max(stats["steps"], 1),
                 token_acceptance_rate=stats["accepted_tokens"] / max(n_tokens, 1),
                 small_forwards=stats["small_calls"], target_forwards=stats["big_calls"], tokens_generated=n_tokens,
                 total_s=total, wall_s=total - stats["compile_s"],
                 s_per_step=(total - stats["compile_s"]) / max(stats["steps"], 1))
    out = common.finish_output(small, tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, scores=final_scores)
