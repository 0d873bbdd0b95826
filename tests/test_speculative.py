"""The speculative engine: exact laws at engine level, greedy equivalence, cached rows, stats, errors.

Tolerances: with N rows, a cell of probability p has standard error sqrt(p (1 - p) / N); every cell must be within
5 standard errors (+1e-3 for cells whose probability is ~0), which a correct sampler fails with probability < 1e-4
over the whole test file.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.lm import from_params
from rss_jax.models import ModelConfig, build_model
from rss_jax.loading.names import flatten
from flax import nnx

V = 8
N = 30000
PROMPT = [1, 5, 2]


def _model(layers, seed, scale):
    cfg = ModelConfig(family="llama", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=layers,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64, eos_token_ids=(0,))
    flat = flatten(nnx.to_pure_dict(nnx.state(build_model(cfg, seed))))
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) * (1 if "norm" in k else scale) + (0 if "norm" in k else 0.3 * rng.normal(size=v.shape))
            for k, v in flat.items()}
    return from_params(cfg, flat, source=f"tiny-{layers}-{seed}")


@pytest.fixture(scope="module")
def trio():
    """target (3 layers), aligned draft and SFT draft (1 layer each, different weights)."""
    return _model(3, 0, 10.0), _model(1, 1, 10.0), _model(1, 2, 10.0)


def _softmax(x, t=1.0):
    z = x / t
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _next_logits(lm, prefix):
    """Uncached logits after `prefix` and after prefix + [x] for every x: ([V], [V, V])."""
    seqs = np.array([prefix + [x] for x in range(V)])
    full = np.asarray(lm.logits(seqs), dtype=np.float64)
    return full[0, -2], full[:, -1]


def _laws(trio, rule):
    """Exact law of the first two tokens: first [V], second [V, V] (row = first token)."""
    parts = [_next_logits(m, PROMPT) for m in trio]
    first = rule(*(p[0] for p in parts))
    second = np.stack([rule(*(p[1][x] for p in parts)) for x in range(V)])
    return first, second


def _exact_sss(lt, ld, ls, t=1.0):
    return _softmax(lt + ld - ls, t)


def _paper(lt, ld, ls):
    ref, r, sft = _softmax(lt), _softmax(ld), _softmax(ls)
    accept = np.minimum(1.0, ref / sft)
    beta = np.sum(r * accept)
    resid = np.maximum(r * (ref / sft - 1.0), 0.0)
    fallback = _exact_sss(lt, ld, ls)
    resid = resid / resid.sum() if resid.sum() > 0 else fallback
    return r * accept + (1 - beta) * resid


def _check_two_token_law(out, first, second):
    toks = out.tokens
    assert (out.lengths == 2).all()
    joint = first[:, None] * second
    counts = np.zeros((V, V))
    np.add.at(counts, (toks[:, 0], toks[:, 1]), 1)
    freq = counts / len(toks)
    tol = 5 * np.sqrt(joint * (1 - joint) / len(toks)) + 1e-3
    assert np.all(np.abs(freq - joint) <= tol), np.abs(freq - joint).max()


@pytest.mark.parametrize("method,mode,draft_top_k,draft_t", [("sd", "exact", None, None), ("sss", "exact", None, None),
                                                             ("sss", "paper", None, None), ("eft", "exact", None, None),
                                                             ("sd", "exact", 3, 0.6), ("sss", "exact", 3, 1.7)])
def test_engine_two_token_law(trio, method, mode, draft_top_k, draft_t):
    """draft_top_k and draft_temperature change only the proposal (docs/algorithms.md §2.6): the output law must
    not change."""
    target, draft, sft = trio
    if method == "sd":
        first, second = _laws(trio, lambda lt, ld, ls: _softmax(lt))
    elif mode == "paper":
        first, second = _laws(trio, _paper)  # the paper rule's own law (equals p~ only when C = 1)
    else:
        first, second = _laws(trio, _exact_sss)
    out = rj.generate(target, [PROMPT] * N, method=method, draft=draft, sft=sft, k=3, mode=mode,
                      max_new_tokens=2, temperature=1.0, eos=[], seed=11, draft_top_k=draft_top_k,
                      draft_temperature=draft_t)
    _check_two_token_law(out, first, second)
    if method != "eft":
        assert 0.0 < out.stats["acceptance_rate"] < 1.0


def test_draft_temperature_moves_the_proposal_and_a_mismatched_q_is_caught(trio, monkeypatch):
    """draft_temperature reaches the loop (acceptance moves with it; engine.spec_config carries it; the target's T,
    and EFT, which drafts nothing, fold to the default), and drafts sampled at another temperature than the q in
    min(1, p/q) sample a wrong law that the same check rejects."""
    from rss_jax import engine
    from rss_jax.decoding import speculative
    target, draft, sft = trio
    first, second = _laws(trio, lambda lt, ld, ls: _softmax(lt))
    kw = dict(method="sd", draft=draft, k=2, max_new_tokens=2, temperature=1.0, eos=[], seed=13)
    plain = rj.generate(target, [PROMPT] * N, **kw)
    cool = rj.generate(target, [PROMPT] * N, draft_temperature=0.4, **kw)
    _check_two_token_law(cool, first, second)
    assert abs(cool.stats["acceptance_rate"] - plain.stats["acceptance_rate"]) > 0.02
    assert engine.spec_config(target, "sd", draft, draft_temperature=0.4).proposal_temperature == 0.4
    assert engine.spec_config(target, "sd", draft, temperature=0.7, draft_temperature=0.7).draft_temperature is None
    assert engine.spec_config(target, "eft", draft, sft, draft_temperature=0.4).draft_temperature is None
    with pytest.raises(ValueError, match="finite number > 0"):
        engine.spec_config(target, "sd", draft, draft_temperature=float("inf"))
    # the wrong rule: drafts drawn at the target's T while q is computed at draft_temperature (another config than
    # above, so the patched sampler is compiled in)
    real = speculative.sampling.sample_rows
    monkeypatch.setattr(speculative.sampling, "sample_rows",
                        lambda keys, logits, temperature, *a: real(keys, logits, 1.0, *a))
    wrong = rj.generate(target, [PROMPT] * N, draft_temperature=0.3, **kw)
    with pytest.raises(AssertionError):
        _check_two_token_law(wrong, first, second)


KEEP = [0, 2, 3, 5, 6]  # a trimmed draft vocabulary (0 is the EOS id and would be added anyway)


def _restricted_sss(lt, ld, ls):
    """Exact SSS law of trimmed drafts: pi_r = pi_sft = 0 outside KEEP, so p~ = p_ref pi_r / pi_sft is 0 there."""
    z = np.full_like(lt, -np.inf)
    z[KEEP] = lt[KEEP] + ld[KEEP] - ls[KEEP]
    return _softmax(z)


@pytest.fixture(scope="module")
def trimmed_trio(trio):
    from training import trim_vocab
    target, draft, sft = trio
    return target, trim_vocab(draft, [2, 3, 5, 6]), trim_vocab(sft, KEEP)


def test_trimmed_head_logits_and_round_trip(trio, trimmed_trio, tmp_path):
    """The trimmed head scores exactly the kept ids with the full head's values (-inf elsewhere), and survives
    save / load."""
    draft, trimmed = trio[1], trimmed_trio[1]
    assert trimmed.config.head_token_ids == tuple(KEEP)
    seqs = [PROMPT + [4, 7]]
    full, cut = np.asarray(draft.logits(seqs)), np.asarray(trimmed.logits(seqs))
    np.testing.assert_allclose(cut[..., KEEP], full[..., KEEP], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(np.delete(cut, KEEP, axis=-1)))
    trimmed.save(str(tmp_path / "t"))
    back = rj.load(str(tmp_path / "t"))
    assert back.config.head_token_ids == tuple(KEEP)
    np.testing.assert_array_equal(np.asarray(back.logits(seqs)), cut)


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_engine_law_with_trimmed_drafts(trimmed_trio, method):
    """SD with a trimmed draft still samples the full target law; exact SSS with drafts trimmed together samples
    p_ref pi_r / pi_sft restricted to their vocabulary (and EFT, the same code path, the same law)."""
    target, draft, sft = trimmed_trio
    rule = (lambda lt, ld, ls: _softmax(lt)) if method == "sd" else _restricted_sss
    first, second = _laws(trimmed_trio, rule)
    out = rj.generate(target, [PROMPT] * N, method=method, draft=draft, sft=sft, k=3, max_new_tokens=2,
                      temperature=1.0, eos=[], seed=13)
    _check_two_token_law(out, first, second)
    if method == "sd":
        assert first[[1, 4, 7]].sum() > 0.05  # the target does emit tokens the draft cannot propose


def test_trimmed_sft_must_cover_the_aligned_draft(trio, trimmed_trio):
    from training import trim_vocab
    target, draft, _ = trio
    with pytest.raises(ValueError, match="trimmed head.*Trim both drafts with the same token ids"):
        rj.generate(target, [PROMPT], method="sss", draft=draft, sft=trimmed_trio[2])
    with pytest.raises(ValueError, match=r"can emit 1 of them \(e.g. \[4\]\)"):
        rj.generate(target, [PROMPT], method="eft", draft=trim_vocab(draft, [2, 3, 4]), sft=trimmed_trio[2])
    # a trimmed aligned draft over a full SFT draft is fine (pi_r = 0 there makes p~ = 0, never infinite)
    out = rj.generate(target, [PROMPT], method="sss", draft=trimmed_trio[1], sft=draft, max_new_tokens=3)
    assert set(out.tokens[0].tolist()) <= set(KEEP)


def test_paper_rule_differs_from_exact_here(trio):
    """Guard that the paper test above can tell the two laws apart on these models (C != 1)."""
    a, _ = _laws(trio, _paper)
    b, _ = _laws(trio, _exact_sss)
    assert np.abs(a - b).max() > 0.02


def test_draft_equal_to_target_accepts_everything(trio):
    """With q = p exactly, every draft is accepted: this fails if verification rows are off by one position."""
    target = trio[0]
    out = rj.generate(target, [PROMPT, [3, 4], [7, 6, 5, 4, 3]], method="sd", draft=target, k=4,
                      max_new_tokens=20, temperature=1.0, eos=[], seed=2)
    s = out.stats
    assert s["acceptance_rate"] == 1.0 and s["alpha_hat"] == 1.0
    assert s["accepted_histogram"][:4] == [0, 0, 0, 0]
    assert s["bonus_tokens"] == s["accepted_histogram"][4]
    assert s["acceptance_by_offset"] == [1.0] * 4


def _greedy_reference(trio, prompt, n, combine):
    seq = list(prompt)
    for _ in range(n):
        logits = [np.asarray(m.logits([seq]), np.float64)[0, -1] for m in trio]
        seq.append(int(np.argmax(combine(*logits))))
    return seq[len(prompt):]


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_temperature_zero_is_greedy_of_target(trio, method):
    target, draft, sft = trio
    combine = (lambda lt, ld, ls: lt) if method == "sd" else (lambda lt, ld, ls: lt + ld - ls)
    prompts = [PROMPT, [4, 4, 6, 2, 7, 1], [3]]
    out = rj.generate(target, prompts, method=method, draft=draft, sft=sft, k=3, max_new_tokens=9,
                      temperature=0.0, eos=[])
    for row, prompt in enumerate(prompts):
        assert out.tokens[row].tolist() == _greedy_reference(trio, prompt, 9, combine)


def test_stats_are_consistent(trio):
    target, draft, sft = trio
    k = 3
    out = rj.generate(target, [PROMPT] * 16, method="sss", draft=draft, sft=sft, k=k, max_new_tokens=24,
                      temperature=1.0, eos=[], seed=4)
    s = out.stats
    hist = np.array(s["accepted_histogram"])
    assert hist.sum() == sum(s["row_blocks"]) == s["row_blocks_total"]
    assert s["accepted"] == int((hist * np.arange(k + 1)).sum())
    assert s["bonus_tokens"] == hist[k]
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / (k * hist.sum()))
    assert s["alpha_hat"] == pytest.approx(s["accepted"] / (s["accepted"] + hist[:k].sum()))
    assert np.isfinite(s["mean_c"]) and s["mean_c"] > 0
    assert s["draft_calls"] == s["blocks"] * (k + 1)
    # per-offset acceptance: of the blocks that reached draft i+1 (a >= i), the share that accepted it (a >= i+1)
    assert s["acceptance_by_offset"] == pytest.approx([hist[i + 1:].sum() / hist[i:].sum() for i in range(k)])
    assert s["feature_heads"] is False
    # every block emits a + 1 tokens; the last block of a row may overshoot the budget and is trimmed
    assert (out.lengths == 24).all()
    assert s["new_tokens"] <= sum(s["row_blocks"]) + s["accepted"]


def test_eos_and_authors_code_budget(trio):
    target, draft, sft = trio
    out = rj.generate(target, [PROMPT] * 64, method="sd", draft=draft, k=3, max_new_tokens=12, eos=[0, 7], seed=5)
    for row, n in zip(out.tokens, out.lengths):
        body = row[:n].tolist()
        assert all(t not in (0, 7) for t in body[:-1])
        assert n == 12 or body[-1] in (0, 7)
        assert (row[n:] == -1).all()
    assert (out.lengths < 12).any()
    ac = rj.generate(target, [PROMPT] * 8, method="sss", mode="authors_code", draft=draft, sft=sft, k=3,
                     max_new_tokens=12, eos=[0, 7], seed=5)
    assert (ac.lengths == 12).all()  # the released code never stops at EOS
    assert ac.stats["bonus_tokens"] == 0


def test_vocabulary_mismatch_and_bad_args(trio):
    target, draft, sft = trio
    other = dataclasses.replace(draft.config, vocab_size=V + 3)
    big = from_params(other, {k: np.resize(np.asarray(v), (V + 3,) + v.shape[1:]) if k == "embed_tokens" or
                              k == "lm_head" else np.asarray(v) for k, v in draft.params().items()}, source="big")
    with pytest.raises(ValueError, match="vocabulary mismatch: target 'tiny-3-0'.*draft 'big'"):
        rj.generate(target, [PROMPT], method="sd", draft=big)
    with pytest.raises(ValueError, match="needs a draft model"):
        rj.generate(target, [PROMPT], method="sd")
    with pytest.raises(ValueError, match="needs a sft model"):
        rj.generate(target, [PROMPT], method="sss", draft=draft)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        rj.generate(target, [PROMPT], method="sss", draft=draft, sft=sft, mode="fast")
    with pytest.raises(ValueError, match="k .* must be an integer >= 1"):
        rj.generate(target, [PROMPT], method="sd", draft=draft, k=0)
    with pytest.raises(ValueError, match="draft_temperature must be a finite number > 0"):
        rj.generate(target, [PROMPT], method="sd", draft=draft, draft_temperature=0.0)
    with pytest.raises(ValueError, match="SSS mode 'paper' assumes the drafts come from pi_r"):
        rj.generate(target, [PROMPT], method="sss", draft=draft, sft=sft, mode="paper", draft_temperature=0.7)


def _exact_marginal(trio, combine, steps):
    """Exact law of the token at generated position `steps` (0-based), summing over every prefix."""
    import itertools
    law = np.zeros(V)
    prefixes = list(itertools.product(range(V), repeat=steps))
    seqs = np.array([PROMPT + list(x) for x in prefixes])
    logits = [np.asarray(m.logits(seqs), np.float64) for m in trio]
    n0 = len(PROMPT)
    dists = _softmax(combine(*logits))  # [P, T, V]
    for i, x in enumerate(prefixes):
        w = np.prod([dists[i, n0 - 1 + t, x[t]] for t in range(steps)])
        law += w * dists[i, n0 - 1 + steps]
    return law


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_fourth_token_marginal_across_blocks(trio, method):
    """With K = 2 the 4th token always comes from a later block than the first: its marginal law over N rows must
    equal the exact marginal of the target (sum over all V^3 prefixes)."""
    target, draft, sft = trio
    combine = (lambda lt, ld, ls: lt) if method == "sd" else (lambda lt, ld, ls: lt + ld - ls)
    law = _exact_marginal(trio, combine, 3)
    out = rj.generate(target, [PROMPT] * N, method=method, draft=draft, sft=sft, k=2, max_new_tokens=4,
                      temperature=1.0, eos=[], seed=21)
    freq = np.bincount(out.tokens[:, 3], minlength=V) / N
    tol = 5 * np.sqrt(law * (1 - law) / N) + 1e-3
    assert np.all(np.abs(freq - law) <= tol), (freq, law)
    assert out.stats["blocks"] >= 2
