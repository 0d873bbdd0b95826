"""The speculative engine: SD, SSS (exact, paper, authors_code) and EFT in one jitted lax.while_loop over blocks.

Pending-token convention. Each row keeps a *pending* token: the last token of its sequence so far (at the start,
the last prompt token), whose keys and values are not yet in any cache; every cache holds `lengths[b]` valid slots,
the same number for the target, the draft and the SFT draft. One block:

1. the draft samples d_1..d_K from the filtered proposal q_j, one cached step each. For SSS and EFT it runs K+1 steps
   on [pending, d_1 .. d_K]: the last only writes d_K and gives pi_r's row K, which the shifted target needs. SD needs
   no row K, so it runs K steps, the first on the two tokens [prev, pending] (prev = the token before pending): that
   rewrites prev's slot with the same values, or writes d_K when the previous block accepted all K drafts;
2. the target (and for SSS the SFT draft) scores the same K+1 tokens in one cached forward: K+1 rows;
3. the verify rule of `rss_jax.sampling` (one target-distribution combiner for every method) gives a and the next
   token; the row emits d_1..d_a and the next token, its lengths advance by a+1 and the emitted last token becomes
   the new pending token. Rejected slots are not copied or cleared: they lie beyond `lengths` and are overwritten.
   (authors_code emits no bonus after a full accept: the row then emits d_1..d_K, advances by K and d_K is pending.)

EFT (product-of-experts decoding) is the same loop with K = 0: three forwards per token on the pending token and a
sample from the exact SSS target, so EFT and exact SSS share every line that decides the distribution.
Sampling keys are keyed by (row id, number of tokens the row has emitted), so a row's result does not depend on the
batch it is in.

Feature-draft heads (`rss_jax.heads.FeatureDraft`: for SD the draft, for SSS/EFT both the aligned and the SFT draft).
Head slot t reads the fused target features h_t (the target's residual stream after the head's tapped layers) and
token x_{t+1}, and predicts x_{t+2}. With L = the target's valid slots at block start, each head cache holds L - 1
slots of true features and the carry holds `tap_prev` = the target's taps of slot L - 1 (from the prompt prefill,
then from the previous block's target forward; prompts need >= 2 tokens). One block:

1. drafting (K >= 1, with the proposal head): step 1 at head slot L - 1 on (fuse(tap_prev), pending), steps
   j = 2..K at slot L + j - 2 on (the previous step's output hidden state fed back, d_{j-1}); q_j are the exact
   distributions the drafts were sampled from, and only they enter the acceptance ratios and residuals;
2. the target forward on [pending, d_1..d_K] with taps: logits rows 0..K and taps H = h_L..h_{L+K};
3. a true-feature re-run of every head the method needs: one (K+1)-token cached pass at head slots L-1..L+K-1 on
   features fuse([tap_prev, h_L..h_{L+K-1}]) and tokens [pending, d_1..d_K]. It overwrites the drafting-time slots
   with true features; for SSS/EFT its logits are pi_r and pi_sft rows 0..K inside p~ (SD asks for no logits);
4. verify as for separate drafts; the row advances by `advance` and tap_prev = H[advance - 1] (the taps of the new
   slot L' - 1; that is H[a] after a rejection or bonus, H[K - 1] after an authors_code full accept).
EFT with heads is K = 0: no drafting, a one-token re-run at slot L - 1 (tap_prev, pending) gives pi_r, pi_sft row 0.
The target's embedding table and the heads' output rows W[D] are gathered once per decode call, outside the loop
(an int8 head's W[D] quantised to int8 there too). SSS and EFT with heads verify over the aligned head's vocabulary
D plus one column that holds each model's tempered mass outside D (`draft_space_logits`): p~, pi_r and the
residuals are zero outside D, so the law is the same as over the whole vocabulary, at |D| / |V| of the verify work.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax import kernels, sampling
from rss_jax.cache import init_cache
from rss_jax.decoding import common
from rss_jax.models.feature_head import full_vocab
from rss_jax.models.base import compute_dtype, decode_model, head_product

NEG = -1e9  # logit for vocabulary rows a model does not have (finite, so l_r - l_sft stays defined)


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    method: str  # "sd" | "sss" | "eft"
    k: int
    mode: str
    shift: float
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    draft_top_k: int | None
    draft_top_p: float | None
    eos: tuple
    vocab: int
    draft_temperature: float | None = None  # the proposal's temperature (None: the target's)
    # test-only: put the drafting-time (fed-back) head logits into p~ instead of the true-feature re-run's, the
    # wrong rule that tests/test_feature_heads.py shows the law check catches; never set it otherwise
    drafting_pi_r: bool = False
    # verify SSS/EFT with heads over the whole vocabulary instead of D plus one column (the same law; for
    # scripts/profile_spec_block.py to time both ways in one run)
    full_vocab_verify: bool = False

    @property
    def proposal_temperature(self) -> float:
        """The temperature the drafts are sampled at, and so the one q is computed with."""
        return self.temperature if self.draft_temperature is None else self.draft_temperature

    @property
    def three_models(self) -> bool:
        return self.method in ("sss", "eft")


def fit_vocab(logits, vocab: int, usable: int | None = None):
    """Trim or pad the last axis to the shared tokenizer's size `vocab`; entries from `usable` on (rows that some
    model of the method lacks) get the logit NEG, so no model's missing row can decide the target distribution."""
    usable = min(vocab, logits.shape[-1], usable or vocab)
    logits = logits[..., :usable]
    if usable == vocab:
        return logits
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, vocab - usable)]
    return jnp.pad(logits, pad, constant_values=NEG)


def draft_space_logits(logits_d, full=None, *, usable, outside, temperature):
    """Logits over a draft vocabulary D plus one column for the rest of the vocabulary, [..., |D| + 1] float32.

    logits_d [..., |D|]: a model's logits at D's ids (-inf where `usable` [|D|] is False). The last column is
    T logsumexp(full / T) over the ids where `outside` [V] is True (the usable ids not in D) of the model's
    full-vocabulary logits `full` [..., V], or -inf without `full` (a model with no mass outside D). So softmax(x / T)
    of the result gives, at D's columns, exactly the full vocabulary's softmax(full / T) at D's ids: the normaliser
    is kept, which SSS's paper and authors_code acceptance ratios and the mean_c statistic need.
    """
    d = jnp.where(usable, jnp.asarray(logits_d, jnp.float32), -jnp.inf)
    if full is None:
        rest = jnp.full(d.shape[:-1] + (1,), -jnp.inf, jnp.float32)
    else:
        scaled = jnp.asarray(full, jnp.float32) / temperature
        rest = temperature * jax.nn.logsumexp(jnp.where(outside, scaled, -jnp.inf), axis=-1, keepdims=True)
    return jnp.concatenate([d, rest], axis=-1)


def _dtype(model):
    return compute_dtype(model)


def _is_head(model) -> bool:
    """A feature-draft head: a FeatureDraft or its merged module (both carry a HeadConfig)."""
    return getattr(getattr(model, "config", None), "kind", None) == "feature_head"


def spec_loop(gd_t, gd_d, gd_s, cfg: SpecConfig, st_t, st_d, st_s, prompt_tokens, prompt_lens, row_ids, base_key):
    """-> (tokens [B, max_new] int32 padded with -1, per-row statistics dict, blocks run)."""
    target, draft = decode_model(gd_t, st_t), decode_model(gd_d, st_d)
    sft = decode_model(gd_s, st_s) if cfg.three_models else None
    heads = _is_head(draft)  # static: feature-draft heads (both drafts are heads for SSS/EFT)
    # SSS/EFT with heads verify in the aligned head's vocabulary D (plus one column for the rest), not over |V|:
    # p~, pi_r and every residual are zero outside D, and the target's (and a differently trimmed SFT head's) mass
    # outside D sits in the extra column, so each log-softmax keeps its full-vocabulary normaliser. The same law,
    # |V|/|D| times less verify work. Static T = 0 (argmax) and shift 0 (p~ = pi_ref) keep the full vocabulary.
    d_space = heads and cfg.three_models and cfg.temperature != 0 and cfg.shift != 0 and not cfg.full_vocab_verify
    b, p = prompt_tokens.shape
    k, n, v = cfg.k, cfg.max_new_tokens, cfg.vocab
    # SD: the target keeps all its rows (the draft's missing ones just get q = 0); SSS/EFT: p~ combines three models,
    # so a token is usable only if all three have it
    usable = min(m.config.vocab_size for m in (target, draft, sft) if m is not None) if cfg.three_models else None
    capacity = p + n + k + 1
    zeros = jnp.zeros((b,), jnp.int32)
    lengths = prompt_lens - 1
    pending = jnp.take_along_axis(prompt_tokens, lengths[:, None], axis=1)[:, 0]

    def new_cache(model):
        cache = init_cache(model.config, b, capacity, _dtype(model))
        return model(prompt_tokens, cache=cache, lengths=zeros)[1]

    if heads:
        head_list = [draft] + ([sft] if sft is not None else [])
        taps = tuple(sorted({int(t) for h in head_list for t in h.config.taps}))  # one target forward for both
        tap_idx = [np.asarray([taps.index(int(t)) for t in h.config.taps]) for h in head_list]
        feat_d = lambda x: draft.fuse(x[..., tap_idx[0], :])  # noqa: E731  [B, T, n_all, E] -> [B, T, E]
        feat_s = (lambda x: sft.fuse(x[..., tap_idx[1], :])) if sft is not None else None  # noqa: E731
        vh = draft.config.vocab_size  # the target's embedding rows
        embed = target.token_embeddings()
        w_out = target.output_matrix()

        def out_rows(model):
            """W[D] of a head, once per decode call, outside the loop: for an int8 head int8 rows with grouped
            scales (a quarter of the bytes that each drafting step and re-run streams), else float rows."""
            rows = jnp.take(w_out, jnp.asarray(model.config.token_ids), axis=0)
            return kernels.quantize_rows(rows) if model.is_int8 else rows

        rows_d = out_rows(draft)
        draft_ids = jnp.asarray(draft.config.token_ids, jnp.int32)
        draft_ok = draft_ids < min(v, usable or v)  # ids fit_vocab keeps (a tokenizer may be smaller)
        # a head and its DPO copy share D, so the re-run can score both in one product (static)
        shared_rows = (sft is not None and tuple(sft.config.token_ids) == tuple(draft.config.token_ids)
                       and sft.is_int8 == draft.is_int8)
        rows_s = None if sft is None or shared_rows else out_rows(sft)
        if d_space:
            # ids (below the shared vocabulary) outside D, whose mass the extra last column of the D space carries
            outside = np.arange(v) < min(v, usable or v)
            ids_np = np.asarray(draft.config.token_ids)
            outside[ids_np[ids_np < v]] = False
            outside = jnp.asarray(outside)
            ids_ext = jnp.concatenate([draft_ids, jnp.zeros((1,), jnp.int32)])  # the last column is never drawn
            to_d = functools.partial(draft_space_logits, usable=draft_ok, outside=outside,
                                     temperature=cfg.temperature)

        def head_logits(model, logits_d):
            return fit_vocab(full_vocab(logits_d, model.config.token_ids, vh), v, usable)

        # prefill: the target over the prompt with taps; each head over slots 0..P-3 (features h_0..h_{P-3}, tokens
        # x_1..x_{P-2}); the padded tail is written too but lies beyond the head's length L - 1 = P - 2
        c_t = init_cache(target.config, b, capacity, _dtype(target))
        _, c_t, taps0 = target(prompt_tokens, cache=c_t, lengths=zeros, taps=taps)

        def head_prefill(model, feat):
            cache = init_cache(model.config, b, capacity, _dtype(model))
            return model(feat(taps0[:, :p - 1]), prompt_tokens[:, 1:], embed, None, cache=cache, lengths=zeros)[2]

        caches = (c_t, head_prefill(draft, feat_d), head_prefill(sft, feat_s) if sft is not None else None)
        tap_prev0 = jnp.take_along_axis(taps0, jnp.maximum(lengths - 1, 0)[:, None, None, None], axis=1)[:, 0]
    else:
        caches = (new_cache(target), new_cache(draft), new_cache(sft) if sft is not None else None)
        tap_prev0 = jnp.zeros((b, 0), jnp.float32)  # unused placeholder
    rows = jnp.arange(b)
    use_eos = cfg.mode != "authors_code"  # the released code always generates max_new_tokens
    stats0 = dict(blocks=zeros, accepted=zeros, bonus=zeros, empty=zeros, hist=jnp.zeros((b, k + 1), jnp.int32),
                  c_sum=jnp.zeros((b,), jnp.float32), c_count=zeros)

    def block(carry):
        it, pending, prev, (c_t, c_d, c_s), lengths, n_emit, out, done, st, tap_prev = carry
        keys = jax.vmap(lambda r, e: common.row_key(base_key, r, e))(row_ids, n_emit)

        # 1. draft K tokens
        def sample_draft(j, logits_j):
            step_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 2 + j))(keys)
            return sampling.sample_rows(step_keys, logits_j, cfg.proposal_temperature, cfg.draft_top_k,
                                        cfg.draft_top_p)

        def draft_step(dc, j):
            c_d, x = dc
            logits, c_d = draft(x[:, None], cache=c_d, lengths=lengths + j)
            l = fit_vocab(logits[:, 0], v, usable)
            d = sample_draft(j, l)
            return (c_d, d), (l, d)

        if heads:
            head_len = lengths - 1  # head slots 0..L-2 hold true features
            if k > 0:
                # step j (0-based) at head slot L-1+j: step 0 reads the true features of slot L-1, later steps the
                # previous step's output hidden state (no target feature exists yet for the drafts)
                def head_step(hc, j):
                    c_d, feat, x = hc
                    logits, hid, c_d = draft(feat, x[:, None], embed, rows_d, cache=c_d, lengths=head_len + j)
                    l = to_d(logits[:, 0]) if d_space else head_logits(draft, logits[:, 0])
                    # sample in the draft vocabulary (a draw over |D| tokens instead of |V|): the same law as sampling
                    # the full-vocabulary row, which is -inf outside D, and q below is computed from l
                    i = sample_draft(j, jnp.where(draft_ok, logits[:, 0], -jnp.inf))
                    d = draft_ids[i]
                    return (c_d, hid.astype(feat.dtype), d), (l, d, i)

                (c_d, _, _), (l_d, d_all, i_all) = jax.lax.scan(head_step, (c_d, feat_d(tap_prev[:, None]), pending),
                                                                jnp.arange(k))
                l_d = jnp.swapaxes(l_d, 0, 1)  # [B, K, V] (D space: [B, K, |D| + 1]), drafting-time logits
                drafts = jnp.swapaxes(d_all, 0, 1)  # [B, K]
                draft_idx = jnp.swapaxes(i_all, 0, 1)  # [B, K], the drafts' columns in D
            else:
                l_d = jnp.zeros((b, 0, len(draft.config.token_ids) + 1 if d_space else v), jnp.float32)
                drafts = draft_idx = jnp.zeros((b, 0), jnp.int32)
        elif cfg.three_models:
            # K + 1 steps on [pending, d_1..d_K]: the last writes d_K and gives pi_r's row K, which SSS needs
            (c_d, _), (l_d, d_all) = jax.lax.scan(draft_step, (c_d, pending), jnp.arange(k + 1))
            l_d = jnp.swapaxes(l_d, 0, 1)  # [B, K+1, V]
            drafts = jnp.swapaxes(d_all, 0, 1)[:, :k]  # [B, K]
        else:
            # SD needs no row K: K steps, the first feeding [prev, pending]. That rewrites prev's slot with the same
            # keys and values, or writes d_K when the previous block accepted all K drafts (so no extra step).
            has_prev = lengths > 0
            two = jnp.stack([jnp.where(has_prev, prev, pending), pending], axis=1)
            logits, c_d = draft(two, cache=c_d, lengths=jnp.maximum(lengths - 1, 0))
            row = jnp.where(has_prev, 1, 0)[:, None, None]
            l0 = fit_vocab(jnp.take_along_axis(logits, row, axis=1)[:, 0], v, usable)
            d1 = sample_draft(0, l0)
            (c_d, _), (l_rest, d_rest) = jax.lax.scan(draft_step, (c_d, d1), jnp.arange(1, k))
            l_d = jnp.concatenate([l0[:, None], jnp.swapaxes(l_rest, 0, 1)], axis=1)  # [B, K, V]
            drafts = jnp.concatenate([d1[:, None], jnp.swapaxes(d_rest, 0, 1)], axis=1)  # [B, K]
        q = sampling.probs_from_logits(l_d[:, :k], cfg.proposal_temperature, cfg.draft_top_k, cfg.draft_top_p)
        fed = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, K+1]

        # 2. verify in one cached forward per verifier
        if heads:
            logits_t, c_t, taps_new = target(fed, cache=c_t, lengths=lengths, taps=taps)  # taps h_L..h_{L+K}
            # 3. true-feature re-run at head slots L-1..L+K-1: features of slots L-1..L+K-1, tokens x_L..x_{L+K}
            feats = jnp.concatenate([tap_prev[:, None], taps_new[:, :k]], axis=1)  # [B, K+1, n_all, E]
            if cfg.three_models:
                if shared_rows:  # both heads score the same rows W[D]: one product, W[D] streamed once, not twice
                    _, hr, c_d = draft(feat_d(feats), fed, embed, None, cache=c_d, lengths=head_len)
                    _, hs, c_s = sft(feat_s(feats), fed, embed, None, cache=c_s, lengths=head_len)
                    both = head_product(draft, jnp.concatenate([draft.normed(hr), sft.normed(hs)], axis=1), rows_d)
                    lr, ls = both[:, :k + 1], both[:, k + 1:]
                else:
                    lr, _, c_d = draft(feat_d(feats), fed, embed, rows_d, cache=c_d, lengths=head_len)
                    ls, _, c_s = sft(feat_s(feats), fed, embed, rows_s, cache=c_s, lengths=head_len)
                if not d_space:
                    l_r, l_s = head_logits(draft, lr), head_logits(sft, ls)  # [B, K+1, V]
                elif shared_rows:
                    l_r, l_s = to_d(lr), to_d(ls)  # [B, K+1, |D| + 1]
                else:  # the SFT head's rows at D, and its mass outside D (its own D may be larger) in the last column
                    ls_full = head_logits(sft, ls)
                    l_r, l_s = to_d(lr), to_d(jnp.take(ls_full, jnp.minimum(draft_ids, v - 1), axis=-1), ls_full)
                if cfg.drafting_pi_r:  # the wrong rule (tests only): fed-back logits inside p~
                    l_r = jnp.concatenate([l_d, l_r[:, k:]], axis=1)
            else:
                _, _, c_d = draft(feat_d(feats), fed, embed, None, cache=c_d, lengths=head_len)  # cache only
        else:
            logits_t, c_t = target(fed, cache=c_t, lengths=lengths)
            if cfg.three_models:
                logits_s, c_s = sft(fed, cache=c_s, lengths=lengths)
                l_r, l_s = l_d, fit_vocab(logits_s, v, usable)
        l_t = fit_vocab(logits_t, v, usable)
        if d_space:
            l_t = to_d(jnp.take(l_t, jnp.minimum(draft_ids, v - 1), axis=-1), l_t)
        if cfg.three_models:
            mode = "exact" if cfg.method == "eft" else cfg.mode
            res = sampling.sss_verify_with_flags(keys, draft_idx if d_space else drafts, q, l_t, l_r, l_s, mode,
                                                 cfg.temperature, cfg.shift, cfg.top_k, cfg.top_p, cfg.min_p)
            if d_space:  # back from D's columns to token ids (authors_code's -1, no bonus, stays)
                res = res._replace(next_token=jnp.where(res.next_token < 0, res.next_token, ids_ext[res.next_token]))
        else:
            p_probs = sampling.probs_from_logits(l_t, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
            res = sampling.verify_with_target(keys, drafts, q, p_probs)
        a, nxt = res.n_accepted, res.next_token

        # 4. emit d_1..d_a and the next token (no bonus in authors_code after a full accept)
        no_bonus = nxt < 0
        count = jnp.where(no_bonus, a, a + 1)
        j = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(j < a[:, None], jnp.concatenate([drafts, nxt[:, None]], axis=1), nxt[:, None])
        valid = j < count[:, None]
        if use_eos:
            hit = common.is_eos(emitted, cfg.eos) & valid
            first = jnp.where(hit.any(axis=1), jnp.argmax(hit, axis=1) + 1, count)
            count = jnp.minimum(count, first)
            eos_done = hit.any(axis=1)
        else:
            eos_done = jnp.zeros_like(done)
        valid = (j < count[:, None]) & ~done[:, None]
        pos = jnp.where(valid, n_emit[:, None] + j, n)  # index n is out of range: dropped
        out = out.at[rows[:, None], pos].set(emitted, mode="drop")
        active = ~done
        new_pending = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
        before_last = jnp.take_along_axis(emitted, jnp.maximum(count - 2, 0)[:, None], axis=1)[:, 0]
        new_prev = jnp.where(count >= 2, before_last, pending)
        advance = jnp.where(no_bonus, k, a + 1)
        if heads:
            # the taps of the new slot L' - 1 = L + advance - 1: H[a], or H[K-1] after an authors_code full accept
            new_tap = jnp.take_along_axis(taps_new, (advance - 1)[:, None, None, None], axis=1)[:, 0]
            tap_prev = jnp.where(active[:, None, None], new_tap, tap_prev)
        lengths = jnp.where(active, lengths + advance, lengths)
        prev = jnp.where(active, new_prev, prev)
        pending = jnp.where(active, new_pending, pending)
        n_emit = jnp.where(active, n_emit + count, n_emit)
        done = done | eos_done | (n_emit >= n)

        act = active.astype(jnp.int32)
        st = dict(st)
        st["blocks"] = st["blocks"] + act
        st["accepted"] = st["accepted"] + a * act
        st["bonus"] = st["bonus"] + ((a == k) & ~no_bonus).astype(jnp.int32) * act
        st["empty"] = st["empty"] + res.empty_residual.astype(jnp.int32) * act
        st["hist"] = st["hist"] + jax.nn.one_hot(a, k + 1, dtype=jnp.int32) * act[:, None]
        if cfg.method == "sss":
            c = sampling.mean_c(l_t, l_r, l_s, cfg.temperature, cfg.shift)  # [B, K+1]
            used = (jnp.arange(k + 1)[None, :] < jnp.where(no_bonus, a, a + 1)[:, None]) & active[:, None]
            st["c_sum"] = st["c_sum"] + jnp.sum(jnp.where(used, c, 0.0), axis=1)
            st["c_count"] = st["c_count"] + jnp.sum(used, axis=1)
        return it + 1, pending, prev, (c_t, c_d, c_s), lengths, n_emit, out, done, st, tap_prev

    def cond(carry):
        it, done = carry[0], carry[7]
        return (it < n + 1) & ~jnp.all(done)

    out0 = jnp.full((b, n), -1, jnp.int32)
    prev = jnp.take_along_axis(prompt_tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    carry = (jnp.int32(0), pending, prev, caches, lengths, zeros, out0, jnp.zeros((b,), bool), stats0, tap_prev0)
    it, _, _, _, _, _, out, _, st, _ = jax.lax.while_loop(cond, block, carry)
    return out, st, it


def _check_pair(lm, other, role: str) -> int:
    """The shared vocabulary size; a real mismatch between two models' tokenizers is an error naming both."""
    if other is None:
        raise ValueError(f"this method needs a {role} model (pass {role}=...)")
    if lm.tokenizer is not None and other.tokenizer is not None:
        if len(lm.tokenizer) != len(other.tokenizer) or lm.tokenizer.get_vocab() != other.tokenizer.get_vocab():
            raise ValueError(f"vocabulary mismatch: target {lm.source!r} ({len(lm.tokenizer)} tokens) and {role} "
                             f"{other.source!r} ({len(other.tokenizer)} tokens) do not share a tokenizer")
        return len(lm.tokenizer)
    if lm.config.vocab_size != other.config.vocab_size:
        raise ValueError(f"vocabulary mismatch: target {lm.source!r} has {lm.config.vocab_size} embedding rows and "
                         f"{role} {other.source!r} has {other.config.vocab_size}; without tokenizers to compare, "
                         "the models must have the same vocabulary size")
    return lm.vocab_size


def _check_head_vocab(draft, sft) -> None:
    """pi_r / pi_sft must be finite wherever pi_r > 0: a trimmed SFT head must score every token the aligned draft
    can emit (drafts trimmed together, `training.trim_vocab` with the same ids, satisfy this)."""
    ids_s = sft.config.head_token_ids
    if not ids_s:
        return
    ids_d = draft.config.head_token_ids
    extra = sorted(set(ids_d) - set(ids_s)) if ids_d else None
    if extra is None or extra:
        what = (f"{len(extra)} of them (e.g. {extra[:5]})" if extra is not None
                else "every token outside the SFT head's")
        raise ValueError(
            f"the SFT draft {sft.source!r} scores only {len(ids_s)} tokens (a trimmed head) but the aligned draft "
            f"{draft.source!r} can emit {what}: pi_r / pi_sft would be infinite there. Trim both drafts with the "
            "same token ids (training.trim_vocab; feature-draft heads: the same token_ids) or use a "
            "full-vocabulary SFT draft.")


def _check_heads(lm, prompt_ids, draft, sft, three: bool) -> None:
    """Feature-draft heads: both drafts or neither (SSS/EFT), each made for this target (HeadTargetMismatch names the
    field that differs), and prompts of at least two tokens (slot L - 1 needs a feature)."""
    models = [(draft, "draft")] + ([(sft, "sft")] if three else [])
    kinds = {role: _is_head(m) for m, role in models if m is not None}
    if not any(kinds.values()):
        return
    if three and None not in (draft, sft) and kinds["draft"] != kinds["sft"]:
        head, other = ("draft", "sft") if kinds["draft"] else ("sft", "draft")
        raise ValueError(f"the {head} is a feature-draft head but the {other} is a separate model: SSS/EFT need "
                         "both drafts of the same kind (two heads, or two separate draft models)")
    for m, role in models:
        if m is not None and _is_head(m):
            m.config.check_target(lm.config, what=f"the target {lm.source!r} (given as {role}'s target)")
    if prompt_ids is not None and min(len(p) for p in prompt_ids) < 2:
        raise ValueError("feature-draft heads need prompts of at least 2 tokens (the first draft reads the target's "
                         "features of the token before the last prompt token); prepend a BOS token or use a chat "
                         "template")


def acceptance_by_offset(hist) -> list:
    """Entry i: of the blocks that reached draft i+1 (a >= i), the fraction that accepted it (a >= i+1); from the
    histogram of a (length K+1). NaN where no block reached that draft."""
    hist = np.asarray(hist, np.int64)
    reached = np.cumsum(hist[::-1])[::-1]  # reached[i] = #blocks with a >= i
    return [float(reached[i + 1] / reached[i]) if reached[i] else float("nan") for i in range(len(hist) - 1)]


def pooled_stats(outputs) -> dict:
    """Acceptance statistics of several speculative runs pooled (e.g. one prompt per call at batch 1): the summed
    histograms of a give alpha_hat, acceptance_rate, acceptance_by_offset and tokens per (row) block."""
    hist = np.sum([np.asarray(o.stats["accepted_histogram"]) for o in outputs], axis=0)
    k = len(hist) - 1
    blocks = int(hist.sum())
    accepted = int((hist * np.arange(k + 1)).sum())
    rejections = int(hist[:k].sum())
    new = sum(int(o.stats["new_tokens"]) for o in outputs)
    return {"accepted": accepted, "row_blocks_total": blocks,
            "acceptance_rate": accepted / (k * blocks) if k and blocks else float("nan"),
            "alpha_hat": accepted / (accepted + rejections) if accepted + rejections else float("nan"),
            "acceptance_by_offset": acceptance_by_offset(hist), "tokens_per_block": new / blocks if blocks else
            float("nan")}


def head_draft_temperature(draft, method: str, mode: str, temperature: float) -> float | None:
    """The proposal temperature a calibrated feature-draft head asks for (its draft_temperature_scale times the
    sampling temperature) where the method samples a proposal it can re-temper: SD and exact SSS, temperature > 0.
    None otherwise (EFT drafts nothing; SSS paper/authors_code assume pi_r at the target's temperature)."""
    scale = getattr(draft, "draft_temperature_scale", None)
    if scale is None or not temperature > 0 or method not in ("sd", "sss") or (method == "sss" and mode != "exact"):
        return None
    return float(scale) * float(temperature)


def spec_config(lm, base_cfg, method, draft, sft, k, mode, shift, draft_top_k, draft_top_p,
                draft_temperature=None) -> SpecConfig:
    """The validated static config of `spec_loop` for target `lm`, its `draft` (and `sft` for sss/eft). With
    draft_temperature None, a calibrated head's own proposal temperature is used (`head_draft_temperature`); pass
    the sampling temperature to draft at it instead."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (draft tokens per block) must be an integer >= 1, got {k!r}")
    if draft_top_k is not None or draft_top_p is not None:
        sampling.validate_sampling_args(1.0, draft_top_k, draft_top_p, None)
    draft_temperature = sampling.validate_draft_temperature(draft_temperature)
    if draft_temperature is None:
        draft_temperature = head_draft_temperature(draft, method, mode, base_cfg.temperature)
    if draft_temperature is not None:
        if method == "sss" and mode != "exact":
            raise ValueError(f"draft_temperature changes the proposal, and SSS mode {mode!r} assumes the drafts "
                             "come from pi_r at the target's temperature (its rule never reads q); use mode='exact', "
                             "or leave draft_temperature at None")
        if draft_temperature == base_cfg.temperature or method == "eft":  # the default proposal (EFT drafts none):
            draft_temperature = None  # one compiled program and one --resume hash for the same computation
    three = method in ("sss", "eft")
    _check_heads(lm, None, draft, sft if three else None, three)
    vocab = _check_pair(lm, draft, "draft")
    if three:
        _check_pair(lm, sft, "sft")
        _check_head_vocab(draft, sft)
    if method == "eft":
        k = 0
    cfg = SpecConfig(method=method, k=int(k), mode=mode if method == "sss" else "exact", shift=float(shift),
                     max_new_tokens=base_cfg.max_new_tokens, temperature=base_cfg.temperature, top_k=base_cfg.top_k,
                     top_p=base_cfg.top_p, min_p=base_cfg.min_p, draft_top_k=draft_top_k, draft_top_p=draft_top_p,
                     eos=base_cfg.eos, vocab=vocab, draft_temperature=draft_temperature)
    return cfg


def generate_speculative(lm, prompt_ids, base_cfg, method, draft, sft, k, mode, shift, draft_top_k, draft_top_p,
                         seed, prompt_offset=0, draft_temperature=None):
    cfg = spec_config(lm, base_cfg, method, draft, sft, k, mode, shift, draft_top_k, draft_top_p, draft_temperature)
    _check_heads(lm, prompt_ids, draft, sft if cfg.three_models else None, cfg.three_models)
    for m in (lm, draft, sft if cfg.three_models else None):
        if m is not None:
            common.check_context(m, prompt_ids, cfg.max_new_tokens, extra=cfg.k + 1)
    tokens, lens = common.pad_prompts(prompt_ids, common.bucket(max(len(p) for p in prompt_ids)))
    row_ids = jnp.arange(prompt_offset, prompt_offset + len(prompt_ids), dtype=jnp.int32)
    s = sft if cfg.three_models else draft  # placeholder argument when there is no SFT model (unused)
    t0 = time.perf_counter()
    (out, st, it), compile_s, run_s = common.COMPILED.call(
        spec_loop, (lm.graphdef, draft.graphdef, s.graphdef if cfg.three_models else None, cfg),
        lm.state, draft.state, s.state if cfg.three_models else None, tokens, lens, row_ids, jax.random.key(seed))
    st = {key: np.asarray(val) for key, val in st.items()}
    blocks, acc = int(st["blocks"].sum()), int(st["accepted"].sum())
    rejections = int((st["hist"][:, :cfg.k].sum()))
    stats = {"method": method, "mode": cfg.mode if method == "sss" else None, "k": cfg.k,
             "compile_s": compile_s, "wall_s": run_s, "total_s": time.perf_counter() - t0,
             "blocks": int(it), "target_calls": int(it),
             # heads: K drafting steps and one true-feature re-run of the proposal head per block
             "draft_calls": int(it) * (cfg.k + 1 if cfg.three_models or _is_head(draft) else cfg.k),
             # per-row sums (the §2.7 check of docs/algorithms.md) divide by row_blocks_total, not by `blocks`
             "row_blocks": st["blocks"].tolist(), "row_blocks_total": blocks, "accepted": acc,
             "acceptance_rate": acc / (cfg.k * blocks) if cfg.k and blocks else float("nan"),
             "alpha_hat": acc / (acc + rejections) if (acc + rejections) else float("nan"),
             "accepted_histogram": st["hist"].sum(axis=0).tolist(),
             "acceptance_by_offset": acceptance_by_offset(st["hist"].sum(axis=0)),
             "bonus_tokens": int(st["bonus"].sum()), "empty_residuals": int(st["empty"].sum()),
             "feature_heads": _is_head(draft), "draft_temperature": None if cfg.k == 0 else cfg.proposal_temperature}
    if method == "sss":
        cnt = st["c_count"].sum()
        stats["mean_c"] = float(st["c_sum"].sum() / cnt) if cnt else float("nan")
    output = common.finish_output(lm, out, prompt_ids, stats)
    stats["tokens_per_target_call"] = stats["new_tokens"] / blocks if blocks else float("nan")
    return output
