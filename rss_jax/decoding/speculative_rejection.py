"""Speculative Rejection (Sun et al., NeurIPS 2024; docs/algorithms.md §5): Best-of-N made cheap by pruning.

Start n_init rows per prompt, generate to a decision point, score the partial responses as if complete, keep the best
(1 - alpha) fraction, continue from the gathered KV cache, repeat; return the best finished response. The schedule
is computed on the host before anything is traced, so every round has static shapes (one compiled round per batch
size; start/stop are traced). Rows use BoN's keys: with alpha = 0 this is BoN(n_init) token for token, and a row that
survives is BoN's row of the same index.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import sampler_config
from rss_jax.decoding.best_of_n import SearchOutput, run_population
from rss_jax.rewards import as_reward


def keep_count(n: int, alpha) -> int:
    """round_half_even((1 - alpha) * n), computed exactly on Fraction(str(alpha)), at least 1."""
    return max(1, round((1 - Fraction(str(alpha))) * n))


def schedule(n_init: int, alpha, max_new_tokens: int, stops=None, kv_budget=None, prompt_len: int = 0):
    """-> (sizes [R], stops [R]): rows per prompt in round r and the generated position it stops at.

    Fixed mode (`stops`, increasing positions): decision points at those positions (those >= max_new_tokens are
    dropped). Memory mode (`kv_budget` M tokens per prompt): stop_r = min(floor(M / n_r) - prompt_len,
    max_new_tokens). Either way the last round runs to max_new_tokens, also when n stops shrinking (alpha = 0 or
    n = 1), so alpha = 0 is a single round: BoN(n_init)."""
    if not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}")
    if not 0 <= float(alpha) < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    if (stops is None) == (kv_budget is None):
        raise ValueError("give exactly one of stops (decision positions) or kv_budget (KV tokens per prompt)")
    sizes, ends = [int(n_init)], []
    if stops is not None:
        stops = [int(s) for s in stops]
        if any(s < 1 for s in stops) or any(b <= a for a, b in zip(stops, stops[1:])):
            raise ValueError(f"stops must be strictly increasing positive token positions, got {stops}")
        for s in stops:
            if s >= max_new_tokens or keep_count(sizes[-1], alpha) == sizes[-1]:
                break
            ends.append(s)
            sizes.append(keep_count(sizes[-1], alpha))
    else:
        while True:
            s = min(int(kv_budget) // sizes[-1] - prompt_len, max_new_tokens)
            if s < 1 and not ends:
                raise ValueError(f"kv_budget={kv_budget} holds fewer than prompt ({prompt_len}) + 1 tokens for each "
                                 f"of the {n_init} initial rows; raise it to at least {n_init * (prompt_len + 1)}")
            if s >= max_new_tokens or keep_count(sizes[-1], alpha) == sizes[-1]:
                break
            ends.append(max(s, ends[-1] if ends else 1))
            sizes.append(keep_count(sizes[-1], alpha))
    ends.append(max_new_tokens)
    return sizes, ends


def improvement_score(best_method, ref_candidate_scores) -> float:
    """The Speculative Rejection paper's score 100 * (1 + mean_p (best_method_p - best_ref_p) / (max_ref_p -
    min_ref_p)) over prompts p; ref_candidate_scores [P, N] are the reference BoN's scores (100 = its reward)."""
    ref = np.asarray(ref_candidate_scores, np.float64)
    ref = np.where(np.isfinite(ref), ref, np.nan)
    best, hi, lo = np.nanmax(ref, axis=1), np.nanmax(ref, axis=1), np.nanmin(ref, axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    return float(100.0 * (1.0 + np.mean((np.asarray(best_method, np.float64) - best) / span)))


def speculative_rejection(lm, prompts, reward, alpha, n_init: int, stops=None, kv_budget=None,
                          max_new_tokens: int = 128, temperature: float = 1.0, top_k=None, top_p=None, min_p=None,
                          eos=None, seed: int = 0, chat: bool = True, reference=None) -> SearchOutput:
    """Speculative Rejection with rejection rate `alpha` from `n_init` rows per prompt.

    Decision points: `stops` (generated positions, e.g. [4, 8, 16, 32]) or `kv_budget` (KV tokens per prompt; the
    paper's memory mode); neither means the paper's default of powers of two from 4. The answer is the
    highest-scoring finished response (ties to the lowest row index). `reference`: a BoN output of the same prompts,
    seed and sampling arguments with n >= n_init, to report whether its best row survived.

    Returns SearchOutput as `best_of_n` (candidates by BoN row index; rows pruned unfinished score -inf); stats:
    schedule, stops, cutoffs (per round, per prompt), generated_tokens, decode_slots, rm_tokens, final_rows,
    bon_best_survived (with `reference`), wall_s (decode + reward), compile_s.
    """
    cfg = sampler_config(lm, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    if stops is None and kv_budget is None:
        stops = [1 << k for k in range(2, max(2, max_new_tokens.bit_length()))]
    sizes, ends = schedule(n_init, alpha, max_new_tokens, stops, kv_budget, max(len(p) for p in prompt_ids))
    out = run_population(lm, prompt_ids, cfg, as_reward(reward, lm.tokenizer), sizes, ends, seed)
    out.stats.update(method="spr", alpha=float(alpha), n_init=int(n_init))
    if reference is not None:
        ref = np.asarray(reference.candidate_scores)[:, :n_init]
        best = np.argmax(ref, axis=1)
        out.stats["bon_best_survived"] = [bool(b in rows) for b, rows in zip(best, out.stats["final_rows"])]
    return out
