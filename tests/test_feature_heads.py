"""Feature-draft heads in the speculative engine: exact laws by Monte Carlo, greedy equivalence, refusals.

The oracle is an independent reference computed with uncached forwards only: the target with taps over the full
prefix, each head over the full prefix on the target's TRUE features (head slot t reads h_t and token t+1). Random
heads make the drafting-time proposal (fed-back hidden states) differ from that true-feature output, so a loop that
put the drafting-time pi_r inside p~ samples a different law (test_drafting_time_pi_r_is_caught).

Tolerance: for a law P over cells and N rows, the total variation distance between the empirical frequencies and P
is compared with its own null distribution, simulated by drawing 400 multinomial(N, P) samples: it must lie below
the null mean + 4 null standard deviations (the TV of a correct sampler exceeds it with probability ~1e-4; the seeds
are fixed, so a run is reproducible).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rss_jax as rj
from rss_jax import heads as rheads
from rss_jax.decoding import speculative
from rss_jax.lm import from_params
from rss_jax.loading.names import flatten
from rss_jax.models import ModelConfig, build_model
from rss_jax.models.feature_head import HeadConfig, HeadTargetMismatch, abstract_head, full_vocab, init_head

V = 24
N = 10000
PROMPT = [3, 7, 1, 4]
D_R = (1, 2, 4, 5, 7, 9, 11, 12, 15, 17, 20, 22)  # the aligned head's draft vocabulary (a strict subset)
D_S = tuple(sorted(set(D_R) | {0, 3, 8, 19}))  # the SFT head covers it and more


def _scaled(flat, seed, scale=10.0, noise=0.3):
    rng = np.random.default_rng(seed)
    return {k: np.asarray(v) if "norm" in k else np.asarray(v) * scale + noise * rng.normal(size=np.shape(v))
            for k, v in flat.items()}


def _target(layers=3, hidden=32, vocab=V, seed=0):
    cfg = ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, eos_token_ids=(0,))
    flat = flatten(nnx.to_pure_dict(nnx.state(build_model(cfg, seed))))
    return from_params(cfg, _scaled(flat, seed), source=f"target-{layers}x{hidden}-v{vocab}")


def _head(target_cfg, taps, ids, seed, out_scale=1.0, depth=1):
    """A random head (weights scaled like the target's); out_scale < 1 flattens its logits (more acceptance)."""
    hcfg = HeadConfig.for_target(target_cfg, taps, ids, depth=depth)
    flat = _scaled(flatten(nnx.to_pure_dict(nnx.state(init_head(hcfg, seed)))), seed)
    flat["out_norm"] = flat["out_norm"] * out_scale
    return rheads.from_flat(hcfg, flat, source=f"head-{seed}")


@pytest.fixture(scope="module")
def models():
    lm = _target()
    aligned = _head(lm.config, (0, 2), D_R, 1, depth=2)  # two taps (fused), trimmed vocabulary, two layers
    sft = _head(lm.config, (1,), D_S, 2)  # another tap (the target forward taps the union), one layer
    proposal = _head(lm.config, (0, 2), D_R, 3, out_scale=0.1, depth=2)  # SD's head
    return lm, aligned, sft, proposal


# ---------------------------------------------------------------------------------------------------------------
# the oracle: uncached forwards over full prefixes
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2))
def _target_ref(gd, st, taps, tokens):
    logits, _, hs = nnx.merge(gd, st)(tokens, taps=taps)
    return logits, hs


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _head_ref(gd, st, tap_idx, token_ids, hs, tokens, embed, w_out):
    head = nnx.merge(gd, st)
    feat = head.fuse(hs[:, :-1][:, :, np.asarray(tap_idx)])  # slot t: features h_t ...
    logits, _, _ = head(feat, tokens[:, 1:], embed, w_out[jnp.asarray(token_ids)])  # ... and token t+1
    return full_vocab(logits, token_ids, embed.shape[0])  # row t predicts token t+2


def _next_logits(lm, head_list, seqs):
    """Next-token logits after every prefix of `seqs` [S, T] from position len(PROMPT)-1 on: target [S, T-P+1, V]
    and each head's (true features) [S, T-P+1, V] float64. An int8 head scores with the output rows quantised in
    groups of 32 by NumPy (what the engine streams for it)."""
    from tests.test_quantize import np_dequantize, np_quantize
    taps = tuple(sorted({t for h in head_list for t in h.config.taps})) or (0,)
    tokens = jnp.asarray(seqs, jnp.int32)
    lt, hs = _target_ref(lm.graphdef, lm.state, taps, tokens)
    module = lm.module
    embed, w_out = module.token_embeddings(), module.output_matrix()
    w_int8 = jnp.asarray(np_dequantize(*np_quantize(np.asarray(w_out), 32)))
    p = len(PROMPT)
    out = [np.asarray(lt, np.float64)[:, p - 1:]]
    for h in head_list:
        idx = tuple(taps.index(t) for t in h.config.taps)
        rows = w_int8 if h.quantize == "int8" else w_out
        lh = _head_ref(h.graphdef, h.state, idx, h.config.token_ids, hs, tokens, embed, rows)
        out.append(np.asarray(lh, np.float64)[:, p - 2:])
    return out


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


SD_T = 0.7  # SD runs tempered: a peakier law, so a sharper check
SSS_T = 0.8  # the tempered SSS checks


def _sd_rule(lt):
    return _softmax(lt / SD_T)


def _p_tilde(lt, lr, ls):
    """softmax(l_ref + l_r - l_sft) restricted to the aligned head's vocabulary (temperature 1)."""
    inside = np.isfinite(lr)
    return _softmax(np.where(inside, lt + np.where(inside, lr, 0.0) - np.where(inside, ls, 0.0), -np.inf))


def _paper_rule(lt, lr, ls):
    """The paper rule's own law of one token (drafts from pi_r, accept min(1, ref/sft), residual, p~ fallback)."""
    ref, r, sft = _softmax(lt), _softmax(lr), _softmax(ls)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(r > 0, ref / sft, 0.0)
    accept = np.minimum(1.0, ratio)
    beta = np.sum(r * accept, -1, keepdims=True)
    resid = np.maximum(r * (ratio - 1.0), 0.0)
    resid = resid / resid.sum(-1, keepdims=True)
    return r * accept + (1 - beta) * resid


def _authors_rule(lt, lr, ls):
    """One block of the released-code rule with K = 1: d ~ pi_r, accepted with min(1, pi_ref(d) / pi_r(d)), else
    argmax(l_ref + l_r - l_sft); a full accept emits d and no bonus, so every block emits exactly one token and
    K = 1 decoding iterates this law (the next block starts from true features whichever branch was taken)."""
    ref, r = _softmax(lt), _softmax(lr)
    with np.errstate(divide="ignore", invalid="ignore"):
        accept = np.where(r > 0, np.minimum(1.0, ref / r), 0.0)
    beta = np.sum(r * accept, -1, keepdims=True)
    inside = np.isfinite(lr)
    shifted = np.where(inside, lt + np.where(inside, lr, 0.0) - np.where(inside, ls, 0.0), -np.inf)
    hot = np.arange(lt.shape[-1]) == np.argmax(shifted, -1)[..., None]
    return r * accept + (1 - beta) * hot


def _law3(lm, head_list, rule):
    """Exact joint law [V, V, V] of the first three generated tokens, by enumeration of every 2-token prefix."""
    grid = np.array([[a, b] for a in range(V) for b in range(V)])
    seqs = np.concatenate([np.tile(PROMPT, (len(grid), 1)), grid], axis=1)  # [V^2, P+2]
    logits = _next_logits(lm, head_list, seqs)
    d = rule(*logits)  # [V^2, 3, V]: the laws of tokens 1, 2 | x1, 3 | x1, x2
    first = d[0, 0]
    second = d[::V, 1]  # rows with x2 = 0, one per x1
    third = d[:, 2].reshape(V, V, V)
    return first[:, None, None] * second[:, :, None] * third


@pytest.fixture(scope="module")
def laws(models):
    lm, aligned, sft, _ = models
    return {"sd": _law3(lm, [], _sd_rule), "p_tilde": _law3(lm, [aligned, sft], _p_tilde)}


def _tv_check(samples, law, seed=0):
    """(TV of the empirical law of `samples` [N, m] to `law` over V^m cells, the null threshold)."""
    n = len(samples)
    flat_idx = np.ravel_multi_index(tuple(samples.T), law.shape)
    freq = np.bincount(flat_idx, minlength=law.size) / n
    p = law.ravel() / law.sum()
    null = np.random.default_rng(seed).multinomial(n, p, size=400) / n
    tvs = 0.5 * np.abs(null - p).sum(1)
    return 0.5 * np.abs(freq - p).sum(), tvs.mean() + 4 * tvs.std()


def _check_law(out, law):
    """The pairs (t1, t2) and (t2, t3), and each token's marginal (V cells: the sharpest check); t2 and t3 often
    come from a later block than t1, so they check the head state carried across blocks."""
    toks = out.tokens
    assert (out.lengths == 3).all()
    checks = [([0, 1], law.sum(2)), ([1, 2], law.sum(0)), ([0], law.sum((1, 2))), ([1], law.sum((0, 2))),
              ([2], law.sum((0, 1)))]
    for cols, marginal in checks:
        tv, limit = _tv_check(toks[:, cols], marginal)
        assert tv < limit, (cols, tv, limit)


def _check_offsets(stats, k):
    hist = np.array(stats["accepted_histogram"])
    by = stats["acceptance_by_offset"]
    assert len(by) == k
    for i in range(k):
        assert by[i] == pytest.approx(hist[i + 1:].sum() / hist[i:].sum())


# ---------------------------------------------------------------------------------------------------------------
# engine-level laws
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,draft_top_k,scale", [(1, None, None), (2, None, None), (3, 6, 0.5 / SD_T)])
def test_sd_with_head_samples_the_target_law(models, laws, k, draft_top_k, scale):
    """The target's own law softmax(l_ref / T) for every K (draft_top_k and the proposal temperature change only
    the proposal). K 3 uses a calibrated head: its draft_temperature_scale sets the proposal's temperature."""
    lm, _, _, proposal = models
    law = laws["sd"]
    if scale is not None:
        proposal = dataclasses.replace(proposal, draft_temperature_scale=scale)
    out = rj.generate(lm, [PROMPT] * N, method="sd", draft=proposal, k=k, max_new_tokens=3, temperature=SD_T,
                      eos=[], seed=31 + k, draft_top_k=draft_top_k)
    _check_law(out, law)
    s = out.stats
    assert s["draft_temperature"] == pytest.approx(SD_T if scale is None else 0.5)
    assert s["feature_heads"] and 0.05 < s["acceptance_rate"] < 0.95
    _check_offsets(s, k)
    assert all(0 < x < 1 for x in s["acceptance_by_offset"])
    # the target emits tokens outside the head's vocabulary (the law check covers them)
    assert law.sum((1, 2))[np.setdiff1d(np.arange(V), D_R)].sum() > 0.05


@pytest.mark.parametrize("method,k", [("sss", 1), ("sss", 2), ("sss", 3), ("eft", 0)])
def test_sss_exact_and_eft_with_heads_sample_p_tilde(models, laws, method, k):
    """p~ = softmax(l_ref + l_r - l_sft) on the aligned head's vocabulary, with l_r, l_sft the heads on the target's
    true features; the same for every K and for EFT (K = 0)."""
    lm, aligned, sft, _ = models
    law = laws["p_tilde"]
    # K 3 also samples its proposal at another temperature (the aligned head calibrated to 0.6 of T): p~ (from the
    # heads at T 1) must not move
    if k == 3:
        aligned = dataclasses.replace(aligned, draft_temperature_scale=0.6)
    out = rj.generate(lm, [PROMPT] * N, method=method, draft=aligned, sft=sft, k=max(k, 1), max_new_tokens=3,
                      temperature=1.0, eos=[], seed=51 + k)
    _check_law(out, law)
    assert out.stats["draft_temperature"] == (None if method == "eft" else 0.6 if k == 3 else 1.0)
    assert set(np.unique(out.tokens).tolist()) <= set(D_R)
    if method == "sss":
        s = out.stats
        _check_offsets(s, k)
        assert 0.05 < s["acceptance_rate"] < 0.95 and np.isfinite(s["mean_c"])
    else:
        assert out.stats["k"] == 0 and out.stats["acceptance_by_offset"] == []


@pytest.mark.parametrize("method,k", [("sss", 2), ("eft", 0)])
def test_heads_sharing_a_draft_vocabulary_sample_p_tilde(models, method, k):
    """An SFT head with the aligned head's own vocabulary (as a head and its DPO copy have): the re-run scores both
    heads with one product over the shared rows W[D]; the law is still p~ (at a temperature other than 1, so that
    verifying in D with the target's outside mass in one extra column is checked against softmax(... / T))."""
    lm, aligned, _, _ = models
    sft = _head(lm.config, (1,), D_R, 4)
    law = _law3(lm, [aligned, sft], lambda *l: _p_tilde(*(x / SSS_T for x in l)))  # p~ at temperature SSS_T
    out = rj.generate(lm, [PROMPT] * N, method=method, draft=aligned, sft=sft, k=max(k, 1), max_new_tokens=3,
                      temperature=SSS_T, eos=[], seed=61 + k)
    _check_law(out, law)
    assert set(np.unique(out.tokens).tolist()) <= set(D_R)


@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_draft_space_keeps_full_vocabulary_normalisers(temperature):
    """SSS/EFT with heads verify over D plus one column for the rest: the tempered log-softmax at D's columns and
    the mean_c statistic equal NumPy's over the whole vocabulary (target finite everywhere, aligned head -inf
    outside D, SFT head -inf outside a wider D_S; one id of D marked unusable)."""
    from rss_jax import sampling
    rng = np.random.default_rng(3)
    ids = np.asarray(D_R)
    usable = ids != 20  # id 20 unusable: -inf in every model
    lt = rng.normal(size=(2, 3, V)) * 2
    lr = np.full((2, 3, V), -np.inf)
    lr[..., ids] = rng.normal(size=(2, 3, len(ids)))
    ls = np.full((2, 3, V), -np.inf)
    ls[..., np.asarray(D_S)] = rng.normal(size=(2, 3, len(D_S)))
    for x in (lt, lr, ls):
        x[..., 20] = -np.inf
    outside = np.ones(V, bool)
    outside[ids] = False
    to_d = functools.partial(speculative.draft_space_logits, usable=usable, outside=outside, temperature=temperature)
    dt, dr, ds = to_d(lt[..., ids], lt), to_d(lr[..., ids]), to_d(ls[..., ids], ls)

    def log_softmax(z):
        z = z / temperature
        return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)

    for d, full in ((dt, lt), (dr, lr), (ds, ls)):
        got = np.asarray(jax.nn.log_softmax(d / temperature, axis=-1))[..., :-1]
        np.testing.assert_allclose(got[..., usable], log_softmax(full)[..., ids[usable]], rtol=1e-5, atol=1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.exp(log_softmax(lr) + log_softmax(lt) - log_softmax(ls))
    want = np.where(np.isfinite(lr), terms, 0.0).sum(-1)
    np.testing.assert_allclose(np.asarray(sampling.mean_c(dt, dr, ds, temperature)), want, rtol=1e-5)


def test_int8_heads_sample_their_own_p_tilde(models):
    """int8 heads (`quantized("int8")`: int8 matrices, and int8 output rows W[D] in the decode loop): exact SSS
    samples p~ of the int8 heads, whose logits the oracle computes from NumPy-quantised output rows."""
    lm, aligned, sft, _ = models
    a8, s8 = aligned.quantized("int8"), sft.quantized("int8")
    law = _law3(lm, [a8, s8], lambda *l: _p_tilde(*(x / SSS_T for x in l)))
    out = rj.generate(lm, [PROMPT] * N, method="sss", draft=a8, sft=s8, k=2, max_new_tokens=3, temperature=SSS_T,
                      eos=[], seed=71)
    _check_law(out, law)
    assert 0.05 < out.stats["acceptance_rate"] < 0.95


def test_drafting_time_pi_r_is_caught(models, laws, monkeypatch):
    """The wrong rule (the drafting-time, fed-back pi_r inside p~) samples a measurably different law: the same
    check rejects it."""
    lm, aligned, sft, _ = models
    law = laws["p_tilde"]
    monkeypatch.setattr(speculative, "SpecConfig", functools.partial(speculative.SpecConfig, drafting_pi_r=True))
    out = rj.generate(lm, [PROMPT] * N, method="sss", draft=aligned, sft=sft, k=2, max_new_tokens=3,
                      temperature=1.0, eos=[], seed=43)
    tv, limit = _tv_check(out.tokens[:, :2], law.sum(2))
    assert tv > 2 * limit, (tv, limit)


def test_draft_temperature_scale_is_saved_loaded_and_used(models, tmp_path):
    """A head's draft_temperature_scale survives save/load (and deepen), sets the proposal temperature of SD and
    exact SSS when draft_temperature is not given, and folds away where the method drafts nothing or assumes the
    target's temperature; a bad scale is refused by name."""
    from rss_jax import engine
    from rss_jax.loading.names import CheckpointError
    lm, aligned, sft, proposal = models
    head = dataclasses.replace(proposal, draft_temperature_scale=0.8)
    path = head.save(str(tmp_path / "h"))
    back = rj.load(path)
    assert back.draft_temperature_scale == 0.8 and "draft_temperature_scale=0.8" in repr(back)
    assert rheads.deepen(back, 3).draft_temperature_scale == 0.8
    assert rj.load(proposal.save(str(tmp_path / "plain"))).draft_temperature_scale is None
    cal = dataclasses.replace(aligned, draft_temperature_scale=0.8)
    assert engine.spec_config(lm, "sd", head, temperature=0.5).proposal_temperature == pytest.approx(0.4)
    assert engine.spec_config(lm, "sd", head, temperature=0.5, draft_temperature=0.5).draft_temperature is None
    assert engine.spec_config(lm, "sd", head, temperature=0.5, draft_temperature=0.3).proposal_temperature == 0.3
    assert engine.spec_config(lm, "sss", cal, sft, temperature=0.5).proposal_temperature == pytest.approx(0.4)
    for kw in (dict(method="sss", mode="paper"), dict(method="sss", mode="authors_code"), dict(method="eft")):
        assert engine.spec_config(lm, draft=cal, sft=sft, temperature=0.5, **kw).draft_temperature is None
    assert engine.spec_config(lm, "sd", head, temperature=0.0).draft_temperature is None
    for bad in (0.0, -1.0, float("nan"), "0.8", True):
        with pytest.raises(ValueError, match="draft_temperature_scale must be a finite number > 0"):
            dataclasses.replace(proposal, draft_temperature_scale=bad)
    marker = tmp_path / "h" / "rss_jax.json"
    marker.write_text(marker.read_text().replace('"draft_temperature_scale": 0.8', '"draft_temperature_scale": -2'))
    with pytest.raises(CheckpointError, match="draft_temperature_scale"):
        rj.load(path)


def test_paper_mode_with_heads(models):
    """The first token follows the paper rule's own law (pi_r = the head on true features); per-seed deterministic.
    At T = SSS_T: its acceptance ratio pi_ref(d) / pi_sft(d) needs the tempered normalisers over the whole
    vocabulary (the target's and the wider SFT head's mass outside the aligned head's vocabulary)."""
    lm, aligned, sft, _ = models
    seqs = np.array([PROMPT + [0]])
    first = _paper_rule(*(x[:, 0] / SSS_T for x in _next_logits(lm, [aligned, sft], seqs)))[0]
    kw = dict(method="sss", mode="paper", draft=aligned, sft=sft, k=2, max_new_tokens=3, temperature=SSS_T, eos=[])
    out = rj.generate(lm, [PROMPT] * (N // 2), seed=5, **kw)  # a one-token law: half the rows suffice
    tv, limit = _tv_check(out.tokens[:, :1], first)
    assert tv < limit, (tv, limit)
    again = rj.generate(lm, [PROMPT] * (N // 2), seed=5, **kw)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    assert len(out.stats["acceptance_by_offset"]) == 2


def test_authors_code_with_heads_k1(models):
    """authors_code with K = 1 samples the iterated one-block law (exact oracle above): a full accept emits no bonus,
    advances by K and leaves d_K pending with the taps of slot L' - 1 = L + K - 1 (H[K-1], not H[a])."""
    lm, aligned, sft, _ = models
    law = _law3(lm, [aligned, sft], _authors_rule)
    out = rj.generate(lm, [PROMPT] * N, method="sss", mode="authors_code", draft=aligned, sft=sft, k=1,
                      max_new_tokens=3, temperature=1.0, eos=[], seed=7)
    _check_law(out, law)
    s = out.stats
    assert s["bonus_tokens"] == 0 and 0.05 < s["acceptance_rate"] < 0.95  # full accepts happen
    _check_offsets(s, 1)


def test_greedy_sd_with_head_is_greedy_target(models):
    """Temperature 0 with a head: token for token the target's greedy continuation (uncached reference), for
    prompts of different lengths in one batch (2 tokens, the shortest a head accepts)."""
    lm, _, _, proposal = models
    prompts = [PROMPT, [5, 2], [9, 8, 7, 6, 5, 4, 3]]
    n_new = 10
    out = rj.generate(lm, prompts, method="sd", draft=proposal, k=3, max_new_tokens=n_new, temperature=0.0, eos=[])
    width = max(map(len, prompts)) + n_new
    seqs = [list(p) for p in prompts]
    for _ in range(n_new):  # causal: the zero padding after each row does not change its last logits
        padded = np.array([s + [0] * (width - len(s)) for s in seqs])
        logits = np.asarray(lm.logits(padded))
        for row, s in enumerate(seqs):
            s.append(int(np.argmax(logits[row, len(s) - 1])))
    for row, (p, s) in enumerate(zip(prompts, seqs)):
        assert out.tokens[row].tolist() == s[len(p):]


# ---------------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------------


def _abstract_head(target_cfg, taps, ids):
    """A head with abstract weights (the refusals happen before any weight is read)."""
    hcfg = HeadConfig.for_target(target_cfg, taps, ids)
    graphdef, state = nnx.split(abstract_head(hcfg))
    return rheads.FeatureDraft(config=hcfg, graphdef=graphdef, state=state, source="abstract-head")


def test_heads_for_other_targets_and_uncovered_vocabularies_are_refused(models):
    lm, aligned, sft, proposal = models
    for other, field in ((dict(hidden_size=48), "hidden_size"), (dict(num_layers=2), "num_layers"),
                         (dict(vocab_size=V + 6), "vocab_size")):
        cfg = dataclasses.replace(lm.config, **other)
        foreign = _abstract_head(cfg, (0, 1), range(cfg.vocab_size))
        with pytest.raises(HeadTargetMismatch, match=f"{field}="):
            rj.generate(lm, [PROMPT], method="sd", draft=foreign)
        with pytest.raises(HeadTargetMismatch, match=f"{field}="):
            rj.generate(lm, [PROMPT], method="eft", draft=aligned, sft=foreign)
    narrow = _abstract_head(lm.config, (1,), D_R[:-2])  # misses two of the aligned head's tokens
    with pytest.raises(ValueError, match=r"can emit 2 of them \(e.g. \[20, 22\]\).*same token_ids"):
        rj.generate(lm, [PROMPT], method="sss", draft=aligned, sft=narrow)
    separate = lm  # any separate model (here the target itself)
    with pytest.raises(ValueError, match="draft is a feature-draft head but the sft is a separate model"):
        rj.generate(lm, [PROMPT], method="sss", draft=aligned, sft=separate)
    with pytest.raises(ValueError, match="sft is a feature-draft head but the draft is a separate model"):
        rj.generate(lm, [PROMPT], method="eft", draft=separate, sft=sft)
    with pytest.raises(ValueError, match="prompts of at least 2 tokens"):
        rj.generate(lm, [PROMPT, [3]], method="sd", draft=proposal)
