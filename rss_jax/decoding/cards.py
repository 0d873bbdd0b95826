"""CARDS (Li et al., 2024): segment-level rejection sampling, and item-level rejection sampling (RS).

CARDS grows a response segment by segment. A candidate segment is sampled from the model (top-k, temperature) and
ends where the model is unsure: after a token whose next-token entropy (nats, at temperature 1, over the full
vocabulary) reaches tau_u, once the segment has `min_segment` tokens, and at `max_segment` tokens at the latest
(or at EOS, or when the token budget runs out). The high-entropy position opens the next segment. A candidate
ending at generated length t is accepted with probability min(1, exp((r(x, y + s) - tau(t)) / beta)) under the
rising threshold

    rho0 = (1 - alpha) * r(x) + alpha * tau_r,      tau(t) = min(tau_r, rho0 + t * (tau_r - rho0) / N),

N = max_new_tokens. After max_tries - 1 rejections the best of the max_tries candidates is taken.

The candidates of one step are drawn as one batch of max_tries rows from the cached prefix, and the first accepted
one is taken: the same law as drawing them one after another, because every candidate uses its own fresh keys.
Candidate slot i of prompt b reads its own key stream (slot 0: `row_key(seed, b, p)`, the keys plain sampling uses,
so with every first candidate accepted CARDS is plain sampling token for token; slot i > 0: the same under a key
folded with i), and p advances by the tokens the slot has drawn so far, so no key is ever used twice. Stats give
this batched implementation's counts and, under `sequential`, what the one-candidate-at-a-time loop would run.

RS draws whole responses (max_tries rows of Best-of-N's population) and accepts y with probability
min(1, exp((r(x, y) - tau_r) / beta)) under a constant threshold, the best of max_tries after max_tries - 1
rejections; with tau_r >= max r its accepted law is pi * exp(r / beta) exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import SamplerConfig, prefill, sampler_config
from rss_jax.decoding.best_of_n import SearchOutput, run_population
from rss_jax.rewards import as_reward
from rss_jax.models.base import decode_model

SLOT_TAG = 0xCA4D5
ACCEPT_TAG = 0xACC3


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """Static knobs of the segment sampler."""
    sampler: SamplerConfig
    tau_u: float = 3.0
    min_segment: int = 4
    max_segment: int = 64
    fixed: int | None = None  # fixed segment length (TreeBoN's released loop) instead of the entropy rule

    @property
    def width(self) -> int:
        return self.fixed if self.fixed is not None else self.max_segment


def entropy(logits):
    """Entropy in nats of softmax(logits) at temperature 1, [..., V] -> [...]."""
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(jnp.isfinite(lp), jnp.exp(lp) * lp, 0.0), axis=-1)


def threshold(t, r0, tau_r, alpha, n):
    """The rising threshold tau(t) = min(tau_r, rho0 + t (tau_r - rho0) / n), rho0 = (1 - alpha) r0 + alpha tau_r
    (NumPy, broadcasting). An infinite tau_r is the threshold everywhere (-inf: every candidate accepted)."""
    t, r0 = np.asarray(t, np.float64), np.asarray(r0, np.float64)
    if math.isinf(tau_r):
        return np.full(np.broadcast(t, r0).shape, float(tau_r))
    rho0 = (1.0 - alpha) * r0 + alpha * tau_r
    return np.minimum(tau_r, rho0 + t * (tau_r - rho0) / n)


def cards_start(graphdef, capacity: int, state, prompt_tokens, prompt_lens):
    """Prefill: -> (logits of the first generated token [B, V], cache with every prompt token written)."""
    return prefill(nnx.merge(graphdef, state), prompt_tokens, prompt_lens, capacity)


def draw_segments(graphdef, cfg: SegmentConfig, m: int, state, cache, lengths, last, slot_keys, row_ids, stream,
                  budget, active):
    """Draw m candidate segments per prompt from the cached prefix, as one batch of B * m rows.

    cache, lengths [B], last [B, V] (the next-token logits), slot_keys [m] typed keys, row_ids [B], stream [B, m]
    (next key position of every slot), budget [B] (tokens left), active [B]. Returns (segments [B, m, S] -1
    padded, lengths [B, m], entropies [B, m, S] after each token, cache of B * m rows, row lengths [B * m],
    next-token logits [B * m, V], steps run)."""
    model = decode_model(graphdef, state)
    b = lengths.shape[0]
    r_ = b * m
    width = cfg.width
    cache = cache.repeat_rows(m)
    lengths = jnp.repeat(lengths, m)
    last = jnp.repeat(last, m, axis=0)
    rows = jnp.repeat(row_ids, m)
    slots = jnp.tile(jnp.arange(m), b)
    stream = stream.reshape(-1)
    budget = jnp.repeat(budget, m)
    vocab = cfg.sampler.vocab or last.shape[-1]

    def cond(carry):
        t, *_, done = carry
        return (t < width) & ~jnp.all(done)

    def body(carry):
        t, last, cache, lengths, segs, ents, done = carry
        keys = jax.vmap(lambda s, r, p: common.row_key(slot_keys[s], r, p))(slots, rows, stream + t)
        tok = jnp.where(done, -1, cfg.sampler.sample(keys, last))
        segs = segs.at[:, t].set(tok)
        logits, cache = model(jnp.maximum(tok, 0)[:, None], cache=cache, lengths=lengths)
        ent = entropy(logits[:, 0, :vocab])
        ents = ents.at[:, t].set(jnp.where(done, 0.0, ent))
        last = jnp.where(done[:, None], last, logits[:, 0])
        lengths = lengths + (~done).astype(jnp.int32)
        n_tok = t + 1
        if cfg.fixed is not None:
            ended = n_tok >= cfg.fixed
        else:
            ended = ((n_tok >= cfg.min_segment) & (ent >= cfg.tau_u)) | (n_tok >= cfg.max_segment)
        ended = ended | common.is_eos(tok, cfg.sampler.eos) | (n_tok >= budget)
        return t + 1, last, cache, lengths, segs, ents, done | ended

    done0 = ~jnp.repeat(active, m)
    init = (jnp.int32(0), last, cache, lengths, jnp.full((r_, width), -1, jnp.int32),
            jnp.zeros((r_, width), jnp.float32), done0)
    t, last, cache, lengths, segs, ents, _ = jax.lax.while_loop(cond, body, init)
    seg_len = (segs >= 0).sum(axis=1).astype(jnp.int32)
    return (segs.reshape(b, m, width), seg_len.reshape(b, m), ents.reshape(b, m, width), cache, lengths, last, t)


@jax.jit
def adopt(cache, lengths, last, rows):
    """Keep rows `rows` [B] of the fanned-out state."""
    return cache.gather_rows(rows), lengths[rows], last[rows]


@jax.jit
def _log_uniforms(base_key, row_ids, steps, m_arange):
    """log u [B, m] for the accept tests of step steps[b] of prompt row_ids[b]."""
    def one(r, s):
        key = jax.random.fold_in(jax.random.fold_in(base_key, r), s)
        return jnp.log(jax.random.uniform(key, m_arange.shape, jnp.float32, minval=1e-38, maxval=1.0))
    return jax.vmap(one)(row_ids, steps)


def accept_rule(rewards, thresholds, log_u, beta):
    """The first candidate that passes min(1, exp((r - tau) / beta)) among the first m - 1, else the best of all m.

    rewards, thresholds, log_u [..., m] -> (chosen [...] int, accepted [...] bool, candidates drawn by the
    sequential loop [...] int). m = 1 takes candidate 0 untested."""
    rewards = np.asarray(rewards, np.float64)
    m = rewards.shape[-1]
    tested = (np.asarray(log_u, np.float64) < (rewards - np.asarray(thresholds, np.float64)) / beta)[..., : m - 1]
    any_ok = tested.any(axis=-1)
    first = np.argmax(tested, axis=-1) if m > 1 else np.zeros(rewards.shape[:-1], np.int64)
    best = np.argmax(rewards, axis=-1)
    chosen = np.where(any_ok, first, best)
    drawn = np.where(any_ok, first + 1, m)
    return chosen, any_ok, drawn


def check_common(mode, beta, max_tries, tau_r):
    common.check_search_mode(mode)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    if tau_r is None or not isinstance(tau_r, (int, float, np.floating, np.integer)) or math.isnan(tau_r):
        raise ValueError(f"tau_r (the reward threshold) must be a number on the reward's scale, got {tau_r!r}")


def _new_counts():
    return {"target_forwards": 0, "small_forwards": 0, "reward_calls": 0, "reward_rows": 0, "reward_tokens": 0}


def segment_search(lm, prompt_ids, reward, cfg: SegmentConfig, tau_r, alpha, beta, max_tries, seed, prompt_offset,
                   rising=True, counts=None):
    """The CARDS loop over prompt_ids (lists of ids). Returns (responses, final rewards [B], stats)."""
    b, n = len(prompt_ids), cfg.sampler.max_new_tokens
    m = int(max_tries)
    counts = counts if counts is not None else _new_counts()
    seq = {"target_forwards": 0, "reward_calls": 0, "reward_tokens": 0}
    stats = {"compile_s": 0.0, "decode_s": 0.0, "reward_s": 0.0, "segments": [[] for _ in range(b)],
             "thresholds": [[] for _ in range(b)], "accepted": 0, "fallbacks": 0, "steps": 0}

    def score(prm, resp):
        t0 = time.perf_counter()
        out = np.asarray(reward.score(prm, resp), np.float64)
        stats["reward_s"] += time.perf_counter() - t0
        counts["reward_calls"] += 1
        counts["reward_rows"] += len(resp)
        counts["reward_tokens"] += sum(len(p) + len(r) for p, r in zip(prm, resp))
        return out

    def call(fn, static, *a):
        out, c_s, r_s = common.COMPILED.call(fn, static, *a)
        stats["compile_s"] += c_s
        stats["decode_s"] += r_s
        return out

    r0 = score(prompt_ids, [[] for _ in prompt_ids]) if rising else np.full((b,), tau_r)
    seq["reward_calls"] += b if rising else 0
    seq["reward_tokens"] += sum(map(len, prompt_ids)) if rising else 0
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    capacity = tokens.shape[1] + n + 1
    last, cache = call(cards_start, (lm.graphdef, capacity), lm.state, tokens, lens)
    counts["target_forwards"] += 1
    seq["target_forwards"] += b
    lengths = lens
    root = jax.random.key(seed)
    slot_keys = jnp.stack([root] + [jax.random.fold_in(root, SLOT_TAG + i) for i in range(1, m)])
    acc_key = jax.random.fold_in(root, ACCEPT_TAG)
    row_ids = np.arange(prompt_offset, prompt_offset + b, dtype=np.int32)
    stream = np.zeros((b, m), np.int32)
    responses = [[] for _ in range(b)]
    final = np.zeros((b,), np.float64)
    done = np.zeros((b,), bool)
    step_of = np.zeros((b,), np.int32)
    while not done.all():
        budget = np.array([n - len(r) for r in responses], np.int32)
        segs, seg_len, _, rows_cache, rows_len, rows_last, t = call(
            draw_segments, (lm.graphdef, cfg, m), lm.state, cache, lengths, last, slot_keys,
            jnp.asarray(row_ids), jnp.asarray(stream), jnp.asarray(budget), jnp.asarray(~done))
        counts["target_forwards"] += int(t)
        segs, seg_len = np.asarray(segs), np.asarray(seg_len)
        live = np.flatnonzero(~done)
        cands = {(i, j): segs[i, j, : seg_len[i, j]].tolist() for i in live for j in range(m)}
        prm = [prompt_ids[i] for i in live for j in range(m)]
        resp = [responses[i] + cands[i, j] for i in live for j in range(m)]
        r = np.zeros((b, m))
        r[live] = score(prm, resp).reshape(len(live), m)
        gen_len = np.array([[len(responses[i]) + seg_len[i, j] for j in range(m)] for i in range(b)])
        if rising:
            tau = threshold(gen_len, r0[:, None], float(tau_r), float(alpha), n)
        else:
            tau = np.full((b, m), float(tau_r))
        log_u = np.asarray(_log_uniforms(acc_key, jnp.asarray(row_ids), jnp.asarray(step_of), jnp.arange(m)))
        chosen, ok, drawn = accept_rule(r, tau, log_u, beta)
        for i in live:
            c = int(chosen[i])
            seg = cands[i, c]
            responses[i] = responses[i] + seg
            final[i] = r[i, c]
            stats["segments"][i].append(len(seg))
            stats["thresholds"][i].append(float(tau[i, c]))
            stats["accepted" if ok[i] else "fallbacks"] += 1
            stats["steps"] += 1
            seq["target_forwards"] += int(seg_len[i, : drawn[i]].sum())
            seq["reward_calls"] += int(drawn[i])
            seq["reward_tokens"] += int(sum(len(prompt_ids[i]) + gen_len[i, j] for j in range(drawn[i])))
            if len(responses[i]) >= n or any(tok in cfg.sampler.eos for tok in seg):
                done[i] = True
        stream[live] += seg_len[live]
        step_of[live] += 1
        pick = np.arange(b) * m + np.where(np.isin(np.arange(b), live), chosen, 0)
        cache, lengths, last = adopt(rows_cache, rows_len, rows_last, jnp.asarray(pick, jnp.int32))
    stats["r0"] = np.asarray(r0, np.float64).tolist()
    stats["sequential"] = seq
    stats.update(counts)
    return responses, final, stats


def _output(lm, prompt_ids, responses, scores, stats, t_start, n):
    tokens = np.full((len(prompt_ids), n), -1, np.int32)
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = r
    total = time.perf_counter() - t_start
    stats.update(tokens_generated=int((tokens >= 0).sum()), total_s=total, wall_s=total - stats["compile_s"])
    res = common.finish_output(lm, tokens, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)},
                        scores=np.asarray(scores, np.float32))


def mode_sampling(mode, beta, temperature, top_k, eos):
    """Sampling knobs by mode: paper samples at `temperature` (default 1) and stops at EOS; authors_code samples at
    beta (the released code uses CARDS' beta as both temperatures) and never stops early."""
    if mode == "authors_code":
        return (float(beta) if temperature is None else temperature), top_k, []
    return (1.0 if temperature is None else temperature), top_k, eos


def cards(lm, prompts, reward, tau_r, tau_u: float = 3.0, alpha: float = 0.5, beta: float = 0.8,
          mode: str = "paper", max_tries: int = 21, min_segment: int = 4, max_segment: int = 64,
          max_new_tokens: int = 128, temperature=None, top_k: int | None = 40, eos=None, seed: int = 0,
          chat: bool = True, prompt_offset: int = 0) -> SearchOutput:
    """CARDS: segment-level rejection sampling of `lm` under `reward` (a Reward, callable or "vader").

    tau_r: the reward threshold (on the reward's scale); tau_u: the entropy (nats) that ends a segment; alpha:
    where the rising threshold starts between r(prompt) and tau_r; beta: the accept temperature. Candidates are
    sampled top-k (40) at `temperature` (paper: 1.0; authors_code: beta, and no EOS stop, as the released code).
    prompt_offset: prompt b uses the keys of index prompt_offset + b.

    Returns SearchOutput (scores = each response's final reward) with stats: target_forwards (batched forwards:
    the prefill and the decode steps of every draw), small_forwards, reward_calls, reward_rows, reward_tokens,
    tokens_generated, wall_s, steps (segments taken), accepted, fallbacks (best-of-max_tries steps), segments
    (lengths per prompt), thresholds (per prompt and segment), r0, and `sequential`: target_forwards, reward_calls
    and reward_tokens of the one-candidate-at-a-time loop with the same outcome.
    """
    check_common(mode, beta, max_tries, tau_r)
    if not (isinstance(min_segment, int) and isinstance(max_segment, int) and 1 <= min_segment <= max_segment):
        raise ValueError(f"need integers 1 <= min_segment <= max_segment, got {min_segment}, {max_segment}")
    temperature, top_k, eos = mode_sampling(mode, beta, temperature, top_k, eos)
    scfg = sampler_config(lm, max_new_tokens, temperature, top_k, None, None, eos)
    cfg = SegmentConfig(scfg, float(tau_u), int(min_segment), int(max_segment))
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    common.check_context(lm, prompt_ids, max_new_tokens, 1)
    reward = as_reward(reward, lm.tokenizer)
    t_start = time.perf_counter()
    responses, final, stats = segment_search(lm, prompt_ids, reward, cfg, tau_r, alpha, beta, max_tries, seed,
                                             prompt_offset)
    stats.update(method="cards", mode=mode, tau_r=float(tau_r), tau_u=float(tau_u), alpha=float(alpha),
                 beta=float(beta))
    return _output(lm, prompt_ids, responses, final, stats, t_start, max_new_tokens)


def rejection_sampling(lm, prompts, reward, tau_r, beta: float = 0.8, max_tries: int = 21, mode: str = "paper",
                       max_new_tokens: int = 128, temperature=None, top_k=None, top_p=None, eos=None, seed: int = 0,
                       chat: bool = True) -> SearchOutput:
    """Item-level rejection sampling: max_tries whole responses per prompt (Best-of-N's rows and keys, so with
    every first response accepted this is `rj.generate(method="ar")` token for token), the first accepted with
    probability min(1, exp((r - tau_r) / beta)), else the best of max_tries. paper: y ~ the model at `temperature`
    (default 1), EOS stops; authors_code: temperature beta and no EOS stop.

    Returns SearchOutput (scores, candidates [B, max_tries, N], candidate_scores, chosen) with stats as `cards`
    (target_forwards counts the batched population's forwards; `sequential` what drawing one response at a time
    until acceptance costs), accepted / fallbacks per prompt."""
    check_common(mode, beta, max_tries, tau_r)
    temperature, top_k, eos = mode_sampling(mode, beta, temperature, top_k, eos)
    cfg = sampler_config(lm, max_new_tokens, temperature, top_k, top_p, None, eos)
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    t_start = time.perf_counter()
    pop = run_population(lm, prompt_ids, cfg, as_reward(reward, lm.tokenizer), [int(max_tries)], [max_new_tokens],
                         seed)
    b, m = len(prompt_ids), int(max_tries)
    r = np.asarray(pop.candidate_scores, np.float64)
    lens = (pop.candidates >= 0).sum(axis=2)
    acc_key = jax.random.fold_in(jax.random.key(seed), ACCEPT_TAG)
    log_u = np.asarray(_log_uniforms(acc_key, jnp.arange(b, dtype=jnp.int32), jnp.zeros((b,), jnp.int32),
                                     jnp.arange(m)))
    chosen, ok, drawn = accept_rule(r, np.full((b, m), float(tau_r)), log_u, beta)
    tokens = pop.candidates[np.arange(b), chosen]
    st = pop.stats
    stats = {"method": "rs", "mode": mode, "tau_r": float(tau_r), "beta": float(beta),
             "compile_s": st["compile_s"], "target_forwards": max(1, int(lens.max())),  # prefill + decode steps
             "small_forwards": 0, "reward_calls": st["reward_calls"], "reward_rows": b * m,
             "reward_tokens": st["rm_tokens"], "accepted": int(ok.sum()), "fallbacks": int((~ok).sum()),
             "generated_tokens": st["generated_tokens"],
             # one prefill per prompt, then len - 1 fed tokens per response drawn until one is taken
             "sequential": {"target_forwards": int(sum(1 + np.maximum(lens[i, : drawn[i]] - 1, 0).sum()
                                                       for i in range(b))),
                            "reward_calls": int(drawn.sum()),
                            "reward_tokens": int(sum(len(prompt_ids[i]) * drawn[i] + lens[i, : drawn[i]].sum()
                                                     for i in range(b)))}}
    out = _output(lm, prompt_ids, [t[t >= 0].tolist() for t in tokens], r[np.arange(b), chosen], stats, t_start,
                  max_new_tokens)
    out.stats["wall_s"] = st["wall_s"]
    out.candidates, out.candidate_scores, out.chosen = pop.candidates, pop.candidate_scores, chosen.astype(np.int32)
    return out
