"""TreeBoN (Qiu et al., 2024): Best-of-N grown as a tree, pruned by the implicit reward of a DPO draft.

Paper mode: n rows per prompt (Best-of-N's rows and keys) generate the first of n_layers segments of
ceil(N / n_layers) tokens. After each layer but the last, every partial response is scored by the weighted
implicit reward

    r_p(y_1..K) = sum_k w_k * log(pi_dpo(y_k | x, y_<k) / pi_sft(y_k | x, y_<k)),   w_k = 1 / k,  k = 1..K,

the n / n_children best are kept (ties to the lower slot) and each gets n_children children, copies of its KV cache
gathered in place (no re-prefill) that continue with keys of their own. The answer is the full response with the
best `reward`. The generated-token budget is that of Best-of-N(n); with n_layers = 1 it is Best-of-N(n) on the
same rows.

authors_code mode: the released evaluation, which runs the CARDS loop (`rss_jax.decoding.cards`) with fixed
32-token segments and uses as reward the implicit reward over the whole sequence (prompt included) *unshifted* (the
log-prob row that predicts token i+1 read at token i), weights 1 / (i + 1) from the sequence start, and the target
model as the reference instead of the SFT draft.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.decoding import cards as cards_mod, common
from rss_jax.decoding.autoregressive import sampler_config
from rss_jax.decoding.best_of_n import SearchOutput, global_row_ids, population_resume, population_start
from rss_jax.decoding.speculative import _is_head as is_head
from rss_jax.rewards import Reward, as_reward


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, tokens):
    """tokens [B, T] -> (shifted [B, T]: log p(tokens[t] | tokens[<t]) at t >= 1 (0 at t = 0), unshifted [B, T]:
    the row that predicts t + 1 read at tokens[t])."""
    logits, _ = nnx.merge(graphdef, state)(tokens)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    unshifted = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    shifted = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(shifted, ((0, 0), (1, 0))), unshifted


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _head_logprobs(target_graphdef, policy_graphdef, reference_graphdef, taps, tap_index, target_state,
                   policy_state, reference_state, tokens, embed, out_rows, dindex):
    """Feature heads of one target, teacher-forced on tokens [B, T]: one target forward with the union of their
    taps (`taps`; `tap_index` says which of them each head reads), then each head's step-1 log-probs. -> (policy,
    reference) [B, T] with entry t = log p(tokens[t] | tokens[<t]) for t >= 2 (0 at t < 2 and where tokens[t] is
    outside the heads' draft vocabulary: both heads give it probability 0)."""
    _, _, tapped = nnx.merge(target_graphdef, target_state)(tokens, return_hidden=True, taps=taps)
    idx = dindex[tokens[:, 2:]]
    out = []
    for graphdef, state, which in ((policy_graphdef, policy_state, tap_index[0]),
                                   (reference_graphdef, reference_state, tap_index[1])):
        head = nnx.merge(graphdef, state)
        feat = head.fuse(tapped[:, :-1][:, :, list(which)].astype(jnp.float32))
        logits, _, _ = head(feat, tokens[:, 1:], embed, out_rows)
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # slot u predicts token u + 2
        tok = jnp.take_along_axis(lp, jnp.maximum(idx, 0)[..., None], axis=-1)[..., 0]
        out.append(jnp.pad(jnp.where(idx >= 0, tok, 0.0), ((0, 0), (2, 0))))
    return out[0], out[1]


class ImplicitReward(Reward):
    """The weighted implicit reward of a DPO `policy` over a `reference` model.

    shifted=True (TreeBoN's paper): sum over response tokens k = 0.. of (1 / (k + 1)) * (log pi(y_k | x, y_<k) -
    log pi_ref(y_k | x, y_<k)). shifted=False (the released code): sum over every position i of the whole
    sequence x + y of (1 / (i + 1)) * (lp_i - lp_ref_i), lp_i being the log-prob row that predicts token i + 1 read
    at token i.

    policy and reference are separate language models, or (shifted only) two feature-draft heads of `target` with
    the same draft vocabulary, e.g. the aligned head over its SFT head: one target forward with taps feeds both,
    and a response token outside the draft vocabulary adds nothing (both heads give it probability 0). `calls`
    counts scoring calls; each is one batched forward of each model (and of the target for heads)."""

    def __init__(self, policy, reference, shifted: bool = True, target=None, pad_id: int = 0):
        heads = [is_head(m) for m in (policy, reference)]
        if any(heads):
            if not all(heads) or target is None or not shifted:
                raise ValueError("feature-draft heads score the implicit reward only in pairs (policy and reference "
                                 "both heads of `target`, passed as target=) and shifted (paper mode); pass "
                                 "separate models otherwise")
            for h in (policy, reference):
                h.check_target(target)
            if tuple(policy.config.token_ids) != tuple(reference.config.token_ids):
                raise ValueError("the two heads have different draft vocabularies; their log-ratio is undefined on "
                                 "tokens only one of them covers")
        elif policy.config.vocab_size != reference.config.vocab_size:
            raise ValueError(f"policy and reference must share a vocabulary: {policy.config.vocab_size} vs "
                             f"{reference.config.vocab_size} logits")
        self.policy, self.reference, self.shifted, self.pad_id = policy, reference, shifted, pad_id
        self.target, self.heads = target, all(heads)
        self.calls = 0
        if self.heads:
            m = target.module
            ids = np.asarray(policy.config.token_ids)
            self._embed = m.token_embeddings().astype(jnp.float32)
            self._out_rows = jnp.take(m.output_matrix(), jnp.asarray(ids), axis=0).astype(jnp.float32)
            where = np.full((target.config.vocab_size,), -1, np.int32)
            where[ids] = np.arange(len(ids), dtype=np.int32)
            self._dindex = jnp.asarray(where)
            self._taps = tuple(sorted({int(t) for h in (policy, reference) for t in h.config.taps}))
            self._tap_index = tuple(tuple(self._taps.index(int(t)) for t in h.config.taps)
                                    for h in (policy, reference))

    def _logprobs(self, tok):
        """-> (policy, reference) per-position log-probs, shifted or unshifted, float64 [B, T]."""
        if self.heads:
            p, r = (self.policy, self.reference)
            out = _head_logprobs(self.target.graphdef, p.graphdef, r.graphdef, self._taps, self._tap_index,
                                 self.target.state, p.state, r.state, tok, self._embed, self._out_rows, self._dindex)
            return tuple(np.asarray(x, np.float64) for x in out)
        k = 0 if self.shifted else 1
        return tuple(np.asarray(_token_logprobs(m.graphdef, m.state, tok)[k], np.float64)
                     for m in (self.policy, self.reference))

    def token_terms(self, prompt_ids, response_ids):
        """-> list of per-token weighted terms (what `score` sums), one array per row."""
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        tokens, _ = common.pad_prompts(seqs, common.bucket(max(len(s) for s in seqs)), self.pad_id)
        lp, lr = self._logprobs(tokens)
        self.calls += 1
        out = []
        for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
            lo = len(p) if self.shifted else 0
            if self.heads and lo < 2:
                raise ValueError("feature-draft heads need prompts of at least 2 tokens")
            d = lp[i, lo: len(s)] - lr[i, lo: len(s)]
            out.append(d / np.arange(1, len(d) + 1))
        return out

    def score(self, prompt_ids, response_ids):
        return np.array([t.sum() for t in self.token_terms(prompt_ids, response_ids)], np.float32)


def treebon(lm, prompts, reward, n: int = 16, n_children: int = 4, n_layers: int = 4, dpo=None, sft=None,
            mode: str = "paper", max_new_tokens: int = 128, temperature=None, top_k=None, top_p=None, eos=None,
            seed: int = 0, chat: bool = True, tau_r=None, alpha: float = 0.5, beta: float = 0.7,
            segment_tokens: int = 32, max_tries: int = 21) -> SearchOutput:
    """TreeBoN of `lm` with the DPO draft `dpo` and its SFT draft `sft`: separate models over lm's vocabulary, or
    (paper mode) two feature-draft heads of lm, such as the shipped aligned and SFT heads.

    paper: n rows, n_layers layers, n / n_children parents kept after each layer by the implicit reward of dpo over
    sft, n_children children each; the answer is the full response with the best `reward` (a Reward, callable or
    "vader"). Sampling at `temperature` (default 1) with the given filters, EOS stops a row.
    authors_code: the CARDS loop with `segment_tokens`-token segments, the unshifted whole-sequence implicit reward
    of dpo over lm as the reward, threshold tau_r (required: the released runs used 22.0 for OPT-6.7B and -6.5 for
    OPT-13B), alpha, beta (also the sampling temperature), top-k 40, no EOS stop, max_tries; `sft` is not used.

    Returns SearchOutput (scores = `reward` of each answer; in paper mode candidates / candidate_scores hold the
    last layer's rows) with stats: target_forwards, small_forwards (forwards of dpo and sft), reward_calls,
    reward_rows, reward_tokens, tokens_generated, wall_s, layers (paper: stops, cutoffs of each pruning) or the
    CARDS stats (authors_code, with implicit_scores)."""
    common.check_search_mode(mode)
    if dpo is None or (mode == "paper" and sft is None):
        raise ValueError("TreeBoN needs dpo= (the DPO draft) and, in paper mode, sft= (its SFT draft): separate "
                         "models over the target's vocabulary, or two feature-draft heads of the target")
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    reward = as_reward(reward, lm.tokenizer)
    if mode == "authors_code":
        return _treebon_authors(lm, prompt_ids, reward, dpo, tau_r, alpha, beta, segment_tokens, max_tries,
                                max_new_tokens, temperature, top_k, seed)
    for name, v in (("n", n), ("n_children", n_children), ("n_layers", n_layers)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if n % n_children:
        raise ValueError(f"n={n} must be a multiple of n_children={n_children} (n / n_children parents each get "
                         f"n_children children)")
    if n_layers > max_new_tokens:
        raise ValueError(f"n_layers={n_layers} exceeds max_new_tokens={max_new_tokens}: every layer needs a token")
    implicit = ImplicitReward(dpo, sft, shifted=True, target=lm)
    cfg = sampler_config(lm, max_new_tokens, 1.0 if temperature is None else temperature, top_k, top_p, None, eos)
    common.check_context(lm, prompt_ids, max_new_tokens)
    return _treebon_paper(lm, prompt_ids, reward, implicit, cfg, int(n), int(n_children), int(n_layers), seed)


def _treebon_paper(lm, prompt_ids, reward, implicit, cfg, n, n_children, n_layers, seed):
    t_start = time.perf_counter()
    b, nmax = len(prompt_ids), cfg.max_new_tokens
    seg = math.ceil(nmax / n_layers)
    stops = [min(seg * (j + 1), nmax) for j in range(n_layers)]
    stops[-1] = nmax
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    base_key = jax.random.key(seed)
    stats = {"method": "treebon", "mode": "paper", "n": n, "n_children": n_children, "n_layers": n_layers,
             "stops": stops, "cutoffs": [], "compile_s": 0.0, "decode_s": 0.0, "reward_s": 0.0,
             "target_forwards": 0, "small_forwards": 0, "reward_calls": 0, "reward_rows": 0, "reward_tokens": 0}
    slots = np.tile(np.arange(n), (b, 1))
    decode_state, start = None, 1
    for layer, stop in enumerate(stops):
        ids = jnp.asarray(global_row_ids(b, slots + layer * n))
        if layer == 0:
            (decode_state, pos), c_s, r_s = common.COMPILED.call(
                population_start, (lm.graphdef, cfg, n), lm.state, tokens, lens, ids, base_key,
                jnp.asarray(stop, jnp.int32))
            stats["target_forwards"] += int(pos)  # the prefill samples position 0, then one forward per position
        else:
            (decode_state, pos), c_s, r_s = common.COMPILED.call(
                population_resume, (lm.graphdef, cfg), lm.state, decode_state, jnp.asarray(keep), ids, base_key,
                jnp.asarray(start, jnp.int32), jnp.asarray(stop, jnp.int32))
            stats["target_forwards"] += int(pos) - start
        stats["compile_s"] += c_s
        stats["decode_s"] += r_s
        out = np.asarray(decode_state[3]).reshape(b, n, nmax)
        if layer == n_layers - 1:
            break
        resp = [row[row >= 0].tolist() for row in out.reshape(b * n, nmax)]
        t0 = time.perf_counter()
        rp = implicit.score([p for p in prompt_ids for _ in range(n)], resp).reshape(b, n).astype(np.float64)
        stats["reward_s"] += time.perf_counter() - t0
        stats["small_forwards"] += 2
        stats["target_forwards"] += int(implicit.heads)  # heads read the target's features of the rows
        n_par = n // n_children
        order = np.lexsort((np.arange(n)[None].repeat(b, 0), -rp), axis=1)[:, :n_par]
        stats["cutoffs"].append(np.take_along_axis(rp, order[:, -1:], axis=1)[:, 0].tolist())
        parents = np.repeat(order, n_children, axis=1)  # slot p * n_children + c is child c of parent rank p
        keep = (parents + np.arange(b)[:, None] * n).reshape(-1).astype(np.int32)
        start = stop
    resp = [row[row >= 0].tolist() for row in out.reshape(b * n, nmax)]
    t0 = time.perf_counter()
    final = np.asarray(reward.score([p for p in prompt_ids for _ in range(n)], resp), np.float64).reshape(b, n)
    stats["reward_s"] += time.perf_counter() - t0
    stats["reward_calls"] += 1
    stats["reward_rows"] += b * n
    stats["reward_tokens"] += sum(len(prompt_ids[i // n]) + len(r) for i, r in enumerate(resp))
    chosen = np.argmax(final, axis=1)
    best = out[np.arange(b), chosen]
    total = time.perf_counter() - t_start
    stats.update(tokens_generated=int((best >= 0).sum()), generated_tokens=int((out >= 0).sum()), total_s=total,
                 wall_s=stats["decode_s"] + stats["reward_s"])
    res = common.finish_output(lm, best, prompt_ids, stats)
    return SearchOutput(**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)},
                        scores=final[np.arange(b), chosen].astype(np.float32), candidates=out,
                        candidate_scores=final.astype(np.float32), chosen=chosen.astype(np.int32))


def _treebon_authors(lm, prompt_ids, reward, dpo, tau_r, alpha, beta, segment_tokens, max_tries, max_new_tokens,
                     temperature, top_k, seed):
    if tau_r is None:
        raise ValueError("mode='authors_code' TreeBoN needs tau_r, the threshold on the implicit reward's scale "
                         "(the released runs used 22.0 for OPT-6.7B and -6.5 for OPT-13B)")
    cards_mod.check_common("authors_code", beta, max_tries, tau_r)
    if not isinstance(segment_tokens, int) or segment_tokens < 1:
        raise ValueError(f"segment_tokens must be an integer >= 1, got {segment_tokens!r}")
    implicit = ImplicitReward(dpo, lm, shifted=False)
    temperature, top_k, eos = cards_mod.mode_sampling("authors_code", beta, temperature, 40 if top_k is None else
                                                      top_k, None)
    scfg = sampler_config(lm, max_new_tokens, temperature, top_k, None, None, eos)
    cfg = cards_mod.SegmentConfig(scfg, fixed=int(segment_tokens))
    common.check_context(lm, prompt_ids, max_new_tokens, 1)
    t_start = time.perf_counter()
    responses, final, stats = cards_mod.segment_search(lm, prompt_ids, implicit, cfg, float(tau_r), alpha, beta,
                                                       max_tries, seed, 0)
    # each implicit-reward call is one forward of the DPO draft and one of the target (the reference)
    stats["small_forwards"] += implicit.calls
    stats["target_forwards"] += implicit.calls
    stats["sequential"]["small_forwards"] = stats["sequential"]["reward_calls"]
    stats["sequential"]["target_forwards"] += stats["sequential"]["reward_calls"]
    stats.update(method="treebon", mode="authors_code", tau_r=float(tau_r), alpha=float(alpha), beta=float(beta),
                 implicit_scores=np.asarray(final, np.float64).tolist())
    t0 = time.perf_counter()
    scores = np.asarray(reward.score(prompt_ids, responses), np.float32)
    stats["final_score_s"] = time.perf_counter() - t0
    out = cards_mod._output(lm, prompt_ids, responses, scores, stats, t_start, max_new_tokens)
    out.stats["wall_s"] -= out.stats["final_score_s"]  # the gold score is for the caller, not part of the method
    return out
