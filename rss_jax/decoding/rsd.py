"""RSD: Reward-Guided Speculative Decoding (Liao et al., ICML 2025, arXiv 2501.19324; SPEC.md section 6).

Per step: draft one step with the small model, score it with a (process) reward model, keep it if r >= delta, else
regenerate the step with the big model. The law is the mixture omega(r) P_small + nu P_big with omega(r) = 1[r >= delta]
and nu the rejection probability. With n > 1 (the best-of-n variant GSI uses as a baseline) n drafts are drawn and
one is picked by soft BoN on the raw reward (i ~ softmax(beta r)) before the threshold. The big model reads accepted
steps lazily, in one block per max_step_tokens tokens, just before it next writes a step.
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
        max_step_tokens: int = 32, step_end_ids=None, max_steps=None) -> SearchOutput:
    """Reward-guided speculative decoding: `small` drafts each step, `reward` (a ProcessReward scores the last step
    with the real step boundaries; any Reward or callable f(prompt_ids, response_ids) works) judges it against
    `delta`, `big` rewrites rejected steps. Step ends as in `gsi`. Returns SearchOutput (scores = the final
    response's reward) with stats: steps, accepted_steps, acceptance_rate (steps), token_acceptance_rate (tokens of
    accepted steps / all tokens), small_tokens, big_tokens, big_synced_tokens, wall_s (excluding compiles)."""
    if small.config.vocab_size != big.config.vocab_size:
        raise ValueError(f"small and big models must share a vocabulary: {small.config.vocab_size} vs "
                         f"{big.config.vocab_size} logits")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    cfg = sampler_config(small, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    scfg = st.StepConfig(cfg, int(max_step_tokens))
    prompt_ids = common.encode_prompts(small, prompts, chat)
    common.check_context(big, prompt_ids, max_new_tokens, max_step_tokens)
    reward = as_reward(reward, small.tokenizer or big.tokenizer)
    mask = jnp.asarray(st.step_end_mask(small, step_end_ids))
    stats = st.new_stats(("small", "big")) | {"steps": 0, "accepted_steps": 0, "accepted_tokens": 0,
                                             "reward_s": 0.0, "reward_calls": 0}
    t_start = time.perf_counter()
    root = jax.random.key(seed)
    tokens = np.full((len(prompt_ids), max_new_tokens), -1, np.int32)
    final_scores = np.zeros((len(prompt_ids),), np.float32)
    rows = np.arange(n, dtype=np.int32)
    for b, prompt in enumerate(prompt_ids):
        s_ctx, b_ctx, (k_small, k_big, k_pick) = st.prompt_setup(
            small, big, scfg, prompt, max_new_tokens, max_step_tokens, stats, root, b, (SMALL_TAG, BIG_TAG, PICK_TAG))
        response, done_steps = [], []
        while len(response) < max_new_tokens and (max_steps is None or len(done_steps) < max_steps):
            pos0, limit = len(response), min(max_step_tokens, max_new_tokens - len(response))
            cand, lens, _, small_rows = s_ctx.generate(n, mask, rows, k_small, pos0, limit)
            cands = [cand[i, : lens[i]].tolist() for i in range(n)]
            t0 = time.perf_counter()
            r = st.step_reward(reward, prompt, response, done_steps, cands)
            stats["reward_s"] += time.perf_counter() - t0
            stats["reward_calls"] += 1
            idx = 0 if n == 1 else st.gumbel_choice(jax.random.fold_in(k_pick, pos0), r, beta)
            stats["steps"] += 1
            if r[idx] >= delta:
                step = cands[idx]
                s_ctx.commit(small_rows, idx, step)
                b_ctx.defer(step)
                stats["accepted_steps"] += 1
                stats["accepted_tokens"] += len(step)
            else:
                cand_b, lens_b, _, big_rows = b_ctx.generate(1, mask, rows[:1], k_big, pos0, limit)
                step = cand_b[0, : lens_b[0]].tolist()
                b_ctx.commit(big_rows, 0, step)
                s_ctx.defer(step)
            response += step
            done_steps.append(step)
            if any(t in cfg.eos for t in step):
                break
        tokens[b, : len(response)] = response
        t0 = time.perf_counter()
        final_scores[b] = reward.score([prompt], [response])[0]
        stats["reward_s"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    n_tokens = int((tokens >= 0).sum())
    stats.update(method="rsd", n=int(n), delta=float(delta),
                 acceptance_rate=stats["accepted_steps"] / max(stats["steps"], 1),
                 token_acceptance_rate=stats["accepted_tokens"] / max(n_tokens, 1),
                 total_s=total, wall_s=total - stats["compile_s"],
                 s_per_step=(total - stats["compile_s"]) / max(stats["steps"], 1))
    out = common.finish_output(small, tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, scores=final_scores)
