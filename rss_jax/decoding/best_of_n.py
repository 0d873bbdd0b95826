"""Best-of-N and soft Best-of-N (docs/algorithms.md §4), and the population engine Speculative Rejection shares.

A *population* is n sampled responses per prompt from one prefill fanned out to n rows. Rows are laid out
prompt-major (slot b * n + i) and carry the global row id i * B + b, the same id `rj.generate` gives row b, so
  * BoN(1) is `rj.generate(..., method="ar")` with the same seed,
  * BoN(m) for m < n is made of the first m rows of BoN(n) (same tokens, same scores),
  * Speculative Rejection's rows are BoN's rows, token for token, until they are pruned.
The host drives rounds: each round is one compiled decode loop (start and stop positions are traced, so rounds of
the same shape share a compile); between rounds the rows are scored and the survivors gathered from the KV cache.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import SamplerConfig, decode_steps, sampler_config, start_decode
from rss_jax.rewards import as_reward
from rss_jax.models.base import decode_model

SELECT_TAG = 0x5E1EC7  # folded into the seed for soft-BoN's Gumbel noise, apart from the sampling keys


@dataclasses.dataclass
class SearchOutput(common.GenerateOutput):
    """GenerateOutput plus: scores [B] (the chosen response's reward), candidates [B, n, max_new_tokens] (every row
    of the population by row index i, padded with -1; a pruned row holds its partial response), candidate_scores
    [B, n] (final reward of each candidate; -inf for a row pruned before it finished), chosen [B] (row index i)."""
    scores: np.ndarray | None = None
    candidates: np.ndarray | None = None
    candidate_scores: np.ndarray | None = None
    chosen: np.ndarray | None = None


def global_row_ids(n_prompts: int, rows: np.ndarray) -> np.ndarray:
    """rows [B, m] (row index i within each prompt's population) -> global row ids [B * m] = i * B + b."""
    b = np.arange(n_prompts)[:, None]
    return (rows * n_prompts + b).reshape(-1).astype(np.int32)


def population_start(graphdef, cfg: SamplerConfig, fanout: int, state, prompt_tokens, prompt_lens, row_ids,
                     base_key, stop):
    """Round 0: prefill, fan out to `fanout` rows per prompt, decode positions 0 .. stop-1."""
    model = decode_model(graphdef, state)
    decode_state = start_decode(model, cfg, prompt_tokens, prompt_lens, row_ids, base_key, fanout)
    return decode_steps(model, cfg, decode_state, 1, stop, row_ids, base_key)


def population_resume(graphdef, cfg: SamplerConfig, state, decode_state, keep, row_ids, base_key, start, stop):
    """Round r > 0: gather rows `keep` [B'] of every decode-state field (the KV cache included: no re-prefill), then
    decode positions start .. stop-1. row_ids [B'] are the kept rows' global ids."""
    model = decode_model(graphdef, state)
    tok, cache, lengths, out, done = decode_state
    decode_state = (tok[keep], cache.gather_rows(keep), lengths[keep], out[keep], done[keep])
    return decode_steps(model, cfg, decode_state, start, stop, row_ids, base_key)


def soft_choice(scores: np.ndarray, beta, seed: int) -> np.ndarray:
    """scores [B, n] (-inf = not a candidate) -> chosen index [B]. beta None: argmax, ties to the lowest index.
    Otherwise i ~ softmax(beta * scores) by the Gumbel-max trick with noise keyed by the global row id, so the
    choice among the first m rows of a population does not depend on n."""
    scores = np.asarray(scores, np.float64)
    if beta is None:
        return np.argmax(scores, axis=1)
    b, n = scores.shape
    key = jax.random.fold_in(jax.random.key(seed), SELECT_TAG)
    ids = jnp.asarray(global_row_ids(b, np.tile(np.arange(n), (b, 1))))
    gumbel = np.asarray(jax.vmap(lambda r: jax.random.gumbel(common.row_key(key, r, 0), (), jnp.float32))(ids),
                        np.float64).reshape(b, n)
    return np.argmax(np.where(np.isfinite(scores), float(beta) * scores + gumbel, -np.inf), axis=1)


def run_population(lm, prompt_ids, cfg: SamplerConfig, reward, sizes, stops, seed: int = 0, beta=None):
    """The host loop shared by BoN (one round) and Speculative Rejection.

    sizes [R] rows per prompt in each round, stops [R] the generated position each round stops at (the last one is
    max_new_tokens). Between rounds every row is scored (a finished row keeps its final score, an unfinished one is
    scored as if complete), the best sizes[r+1] rows per prompt are kept (stable: ties to the lowest row index) and
    gathered from the KV cache. Finished rows stay candidates whether kept or not. Returns a SearchOutput."""
    t_start = time.perf_counter()
    bsz, n0, nmax = len(prompt_ids), sizes[0], cfg.max_new_tokens
    common.check_context(lm, prompt_ids, nmax)
    from rss_jax import sharding
    sharding.check_batch(lm.mesh, bsz * n0, what=f"the {bsz} prompts x {n0} samples")
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    base_key = jax.random.key(seed)
    pool = np.full((bsz, n0, nmax), -1, np.int32)  # every row's tokens, by row index
    cand = np.full((bsz, n0), -np.inf, np.float64)  # final scores of finished candidates
    final = np.zeros((bsz, n0), bool)
    rows = np.tile(np.arange(n0), (bsz, 1))  # row index of each slot, [B, n_r]
    stats = {"schedule": list(sizes), "stops": list(stops), "cutoffs": [], "compile_s": 0.0, "decode_s": 0.0,
             "reward_s": 0.0, "rm_tokens": 0, "reward_calls": 0, "decode_slots": 0, "rounds": len(sizes),
             "round_s": [], "target_forwards": 0, "small_forwards": 0}

    def score(idx_b, idx_i):
        t0 = time.perf_counter()
        resp = [pool[b, i][pool[b, i] >= 0].tolist() for b, i in zip(idx_b, idx_i)]
        prm = [prompt_ids[b] for b in idx_b]
        s = reward.score(prm, resp) if resp else np.zeros((0,))
        stats["reward_s"] += time.perf_counter() - t0
        stats["rm_tokens"] += sum(len(p) + len(r) for p, r in zip(prm, resp))
        stats["reward_calls"] += 1
        return np.asarray(s, np.float64)

    decode_state, start = None, 1
    for r, (n_r, stop) in enumerate(zip(sizes, stops)):
        ids = jnp.asarray(global_row_ids(bsz, rows))
        stop_a = jnp.asarray(stop, jnp.int32)
        if r == 0:
            (decode_state, pos), c_s, run_s = common.COMPILED.call(
                population_start, (lm.graphdef, cfg, n0), lm.state, tokens, lens, ids, base_key, stop_a)
            stats["target_forwards"] += int(pos)  # the prefill samples position 0, then one forward per position
        else:
            (decode_state, pos), c_s, run_s = common.COMPILED.call(
                population_resume, (lm.graphdef, cfg), lm.state, decode_state, jnp.asarray(keep), ids, base_key,
                jnp.asarray(start, jnp.int32), stop_a)
            stats["target_forwards"] += int(pos) - start
        stats["compile_s"] += c_s
        stats["decode_s"] += run_s
        stats["round_s"].append(run_s)
        stats["decode_slots"] += bsz * n_r * (stop - start + (1 if r == 0 else 0))
        out, done = np.asarray(decode_state[3]).reshape(bsz, n_r, nmax), np.asarray(decode_state[4])
        done = done.reshape(bsz, n_r) | (r == len(sizes) - 1)  # the last round's budget ends every row
        bi = np.repeat(np.arange(bsz), n_r).reshape(bsz, n_r)
        pool[bi, rows] = out
        # final scores for rows that just finished
        new = done & ~final[bi, rows]
        if new.any():
            cand[bi[new], rows[new]] = score(bi[new], rows[new])
            final[bi[new], rows[new]] = True
        if r == len(sizes) - 1:
            break
        # rank every slot: finished rows by their final score, the others by the score of their partial response
        cur = cand[bi, rows].copy()
        open_ = ~done
        if open_.any():
            cur[open_] = score(bi[open_], rows[open_])
        n_next = sizes[r + 1]
        order = np.lexsort((rows, -cur), axis=1)[:, :n_next]  # by score descending, ties to the lowest row
        stats["cutoffs"].append(np.take_along_axis(cur, order[:, -1:], axis=1)[:, 0].tolist())
        keep = (order + np.arange(bsz)[:, None] * n_r).reshape(-1).astype(np.int32)
        rows = np.take_along_axis(rows, order, axis=1)
        start = stop
    chosen = soft_choice(cand, beta, seed)
    best = pool[np.arange(bsz), chosen]
    wall = stats["decode_s"] + stats["reward_s"]
    stats.update(wall_s=wall, total_s=time.perf_counter() - t_start,
                 generated_tokens=int((pool >= 0).sum()), reward_tokens=stats["rm_tokens"],
                 tokens_generated=int((best >= 0).sum()),
                 final_rows=[np.flatnonzero(f).tolist() for f in final])
    out = common.finish_output(lm, best, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, **dict(
        scores=cand[np.arange(bsz), chosen].astype(np.float32), candidates=pool,
        candidate_scores=cand.astype(np.float32), chosen=chosen.astype(np.int32)))


def best_of_n(lm, prompts, reward, n: int, beta=None, max_new_tokens: int = 128, temperature: float = 1.0,
              top_k=None, top_p=None, min_p=None, eos=None, seed: int = 0, chat: bool = True) -> SearchOutput:
    """Best-of-n: sample n responses per prompt (one prefill fanned out to n rows, PRNG keyed by (global row id,
    position)), score them with `reward` and return the best (ties to the lowest row) or, with `beta`, a soft-BoN
    draw i ~ softmax(beta * r). A response that reaches max_new_tokens counts as finished (scored truncated).

    reward: a rss_jax.rewards.Reward, a callable f(prompt_ids, response_ids) -> floats, or "vader".
    Returns SearchOutput: texts, tokens [B, max_new_tokens] (-1 padded), lengths, scores [B], candidates
    [B, n, max_new_tokens], candidate_scores [B, n], chosen [B], stats (generated_tokens, rm_tokens, wall_s, ...).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if beta is not None and not float(beta) >= 0:
        raise ValueError(f"beta must be >= 0 or None, got {beta!r}")
    cfg = sampler_config(lm, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    out = run_population(lm, prompt_ids, cfg, as_reward(reward, lm.tokenizer), [int(n)], [max_new_tokens], seed,
                         beta)
    out.stats["method"] = "bon" if beta is None else "soft_bon"
    return out
