"""GSI: Guided Speculative Inference (Geuter, Mroueh, Alvarez-Melis; arXiv 2506.04118; docs/algorithms.md §6).

Per step: draw n steps from the small model pi_S, score them with the reward and, in one batched teacher-forced pass,
with the big model pi_B; tilt r~_i = r_i + (log pi_B(y_i) - log pi_S(y_i)) / beta; pick i ~ softmax(beta r~); accept
if r~_i >= u, else draw n steps from pi_B and pick j ~ softmax(beta r_j) (soft BoN with the big model). The accept
path samples approximately from pi_B exp(beta r) / Z (self-normalised importance sampling; the error falls like 1/n).
All prompts of a call advance together, one step each per round: a round makes one small-model generation call
for every live prompt's n candidates, one big-model scoring call, one reward call, and, when some prompts fall back,
one big-model generation call for those; finished prompts stay in the batch as idle rows.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from rss_jax.decoding import steps as st
from rss_jax.decoding.best_of_n import SearchOutput

SMALL_TAG, BIG_TAG, PICK_TAG = 0x5A11, 0xB16, 0x91C


def has_boxed(tokenizer, response) -> bool:
    return tokenizer is not None and re.search(r"\\boxed\{[^{}]*\}", tokenizer.decode(response)) is not None


def gsi_select(key, rewards, logp_big, logp_small, beta, u):
    """The GSI decision for one step (pure, jittable, vmappable over leading axes via jax.vmap).

    rewards, logp_big, logp_small [n] -> (index int32, accepted bool, tilted rewards [n] float32, effective sample
    size of the tilted weights softmax(beta r~) float32). With logp_big == logp_small the pick is soft BoN on r."""
    r = jnp.asarray(rewards, jnp.float32)
    tilted = r + (jnp.asarray(logp_big, jnp.float32) - jnp.asarray(logp_small, jnp.float32)) / beta
    # a candidate outside the big model's filtered support (top_k / top_p / min_p) has log pi_B = -inf and weight 0;
    # when every candidate has, nothing can be accepted (the big model then samples the step itself) and the
    # effective sample size is 0, not the NaN of a softmax over nothing
    # (-inf >= u holds for u = -inf, so acceptance needs `some` as well)
    support = jnp.isfinite(tilted)
    some = jnp.any(support)
    logits = jnp.where(some, jnp.where(support, beta * tilted, -jnp.inf), 0.0)
    idx = jax.random.categorical(key, logits).astype(jnp.int32)
    w = jax.nn.softmax(logits)
    ess = jnp.where(some, 1.0 / jnp.sum(w * w), 0.0)
    return idx, some & (tilted[idx] >= u), tilted, ess


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
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    search = st.StepSearch.start(small, big, prompts, reward, n, max_new_tokens, temperature, top_k, top_p, min_p,
                                 eos, chat, max_step_tokens, step_end_ids, max_steps, prompt_offset,
                                 logprob_temperature)
    n, n_prompts, stats, mask = int(n), len(search.prompt_ids), search.stats, search.mask
    s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
        small, big, search.scfg, search.prompt_ids, max_new_tokens, max_step_tokens, stats, jax.random.key(seed),
        int(prompt_offset), (SMALL_TAG, BIG_TAG, PICK_TAG))
    ess_all = []
    while search.active.any():
        live, pos0, limit = search.round()
        cand, lens, logq, small_rows = s_ctx.generate(n, mask, k_small, pos0, limit, search.active)
        cands = st.candidate_steps(cand, lens, n, live)
        r = search.rewards(cands, n, np.float32)
        logp_big, big_rows = b_ctx.score(cand, search.active)
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
        fall = search.active & ~accepted
        if fall.any():  # soft BoN over n steps of the big model, on the raw reward
            cand_b, lens_b, _, big_gen = b_ctx.generate(n, mask, k_big, pos0, limit, fall)
            cands_b = st.candidate_steps(cand_b, lens_b, n, np.flatnonzero(fall))
            j = st.gumbel_choices(k_pick, 2 * pos0 + 1, search.rewards(cands_b, n), beta)
            fell = {b: c[j[b]] for b, c in cands_b.items()}
            b_ctx.commit(big_gen, {b: (b * n + int(j[b]), step) for b, step in fell.items()})
            for b, step in fell.items():
                s_ctx.defer(b, step)
            chosen |= fell
        search.advance(chosen, (lambda b: has_boxed(small.tokenizer, search.responses[b])) if stop_at_boxed
                       else None)
    return search.finish(small, method="gsi", n=n, beta=float(beta), u=float(u),
                         ess_mean=float(np.mean(ess_all)) if ess_all else float("nan"))
