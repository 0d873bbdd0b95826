"""RSD: Reward-Guided Speculative Decoding (Liao et al., ICML 2025, arXiv 2501.19324; docs/algorithms.md §7).

Per step: draft one step with the small model, score it with a (process) reward model, keep it if r >= delta, else
regenerate the step with the big model. The law is the mixture omega(r) P_small + nu P_big with omega(r) = 1[r >= delta]
and nu the rejection probability. With n > 1 (the best-of-n variant GSI uses as a baseline) n drafts are drawn and
one is picked by soft BoN on the raw reward (i ~ softmax(beta r)) before the threshold. The big model reads accepted
steps lazily, in one block per max_step_tokens tokens, just before it next writes a step. All prompts of a call
advance together, one step each per round: one small-model generation call for every live prompt's drafts, one
reward call, and one big-model generation call for the prompts whose draft was rejected.
"""
from __future__ import annotations


import jax
import numpy as np

from rss_jax.decoding import steps as st
from rss_jax.decoding.best_of_n import SearchOutput

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
    search = st.StepSearch.start(small, big, prompts, reward, n, max_new_tokens, temperature, top_k, top_p, min_p,
                                 eos, chat, max_step_tokens, step_end_ids, max_steps, prompt_offset)
    n, stats, mask = int(n), search.stats, search.mask
    stats["accepted_tokens"] = 0
    s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
        small, big, search.scfg, search.prompt_ids, max_new_tokens, max_step_tokens, stats, jax.random.key(seed),
        int(prompt_offset), (SMALL_TAG, BIG_TAG, PICK_TAG))
    while search.active.any():
        live, pos0, limit = search.round()
        cand, lens, _, small_rows = s_ctx.generate(n, mask, k_small, pos0, limit, search.active)
        cands = st.candidate_steps(cand, lens, n, live)
        r = search.rewards(cands, n)
        idx = np.zeros((len(r),), np.int64) if n == 1 else st.gumbel_choices(k_pick, pos0, r, beta)
        stats["steps"] += len(live)
        chosen = {b: cands[b][idx[b]] for b in live if r[b, idx[b]] >= delta}
        s_ctx.commit(small_rows, {b: (b * n + int(idx[b]), step) for b, step in chosen.items()})
        for b, step in chosen.items():
            b_ctx.defer(b, step)
        stats["accepted_steps"] += len(chosen)
        stats["accepted_tokens"] += sum(len(step) for step in chosen.values())
        fall = search.active.copy()
        fall[list(chosen)] = False
        if fall.any():
            cand_b, lens_b, _, big_rows = b_ctx.generate(1, mask, k_big, pos0, limit, fall)
            fell = {b: c[0] for b, c in st.candidate_steps(cand_b, lens_b, 1, np.flatnonzero(fall)).items()}
            b_ctx.commit(big_rows, {b: (b, step) for b, step in fell.items()})
            for b, step in fell.items():
                s_ctx.defer(b, step)
            chosen |= fell
        search.advance(chosen)
    n_tokens = sum(len(x) for x in search.responses)
    return search.finish(small, method="rsd", n=n, delta=float(delta),
                         token_acceptance_rate=stats["accepted_tokens"] / max(n_tokens, 1))
