"""Training feature-draft heads (training/heads.py) on a tiny random Llama target.

* The training-time-test forward equals the cached decode loop, step for step, for every block start.
* The closed-form acceptance equals a NumPy recomputation from the target's and the head's distributions.
* Distillation raises the per-offset acceptance; DPO raises the chosen-minus-rejected log-ratio margin.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import rss_jax as rj  # noqa: E402
from rss_jax.cache import init_cache  # noqa: E402
from rss_jax.lm import LM  # noqa: E402
from rss_jax.models import ModelConfig, build_model  # noqa: E402
from training import heads as th  # noqa: E402

V = 40


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    model = build_model(cfg, 1)
    # larger weights than the 0.02 default, so that the target's distributions are far from uniform
    state = nnx.state(model)
    state = jax.tree.map(lambda x: x * (6.0 if x.ndim >= 2 else 1.0), state)
    nnx.update(model, state)
    gd, st = nnx.split(model)
    lm = LM(config=cfg, graphdef=gd, state=st, source="tiny-target")
    return lm


@pytest.fixture(scope="module")
def records(tiny):
    """Target samples (temperature 0.8) so that the head learns a real next-token law."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, int(rng.integers(3, 6))).tolist() for _ in range(48)]
    out = rj.generate(tiny, prompts, max_new_tokens=14, temperature=0.8, seed=3, eos=[])
    return [{"prompt_ids": p, "response_ids": out.tokens[i, :out.lengths[i]].tolist()} for i, p in enumerate(prompts)]


@pytest.mark.parametrize("depth", [1, 2])
def test_ttt_forward_equals_cached_decode(tiny, depth):
    head = rj.heads.new_head(tiny, taps=(0, 2), token_ids=list(range(0, V, 2)), warm_start=False, seed=3,
                             depth=depth)
    hm = head.module
    s = 18
    toks = jnp.asarray(np.random.default_rng(1).integers(0, V, (1, s)), jnp.int32)
    _, _, taps = tiny.module(toks, taps=(0, 2))
    emb, rows = th.target_tables(tiny, head)
    steps = 4
    out = th.ttt_logits(hm, taps, toks, emb, rows, steps)
    feat = hm.fuse(taps)
    worst = 0.0
    for s0 in range(0, s - steps - 1):
        cache = init_cache(head.config, 1, 64)
        lg, h, cache = hm(feat[:, :s0 + 1], toks[:, 1:s0 + 2], emb, rows, cache=cache,
                          lengths=jnp.zeros((1,), jnp.int32))
        worst = max(worst, float(jnp.abs(lg[:, -1] - out[0][:, s0]).max()))
        a = h[:, -1:]
        for j in range(2, steps + 1):
            slot = s0 + j - 1
            lg, a, cache = hm(a, toks[:, slot + 1:slot + 2], emb, rows, cache=cache,
                              lengths=jnp.full((1,), slot, jnp.int32))
            worst = max(worst, float(jnp.abs(lg[:, 0] - out[j - 1][:, slot]).max()))
    assert worst < 1e-4


def test_deeper_heads_deepen_save_and_refuse(tiny, tmp_path):
    """A head deepened with `deepen` computes what it did (new layers start as the identity), its cached rows equal
    its uncached forward, it saves and loads bit-exactly, and nonsense depths are refused."""
    head = rj.heads.new_head(tiny, taps=(0, 2), token_ids=list(range(0, V, 2)), seed=5)
    deep = rj.heads.deepen(head, 3, seed=7)
    assert deep.config.depth == 3 and deep.config.num_layers == 3 and deep.num_params > head.num_params
    toks = jnp.asarray(np.random.default_rng(2).integers(0, V, (2, 9)), jnp.int32)
    _, _, taps = tiny.module(toks, taps=(0, 2))
    emb, rows = th.target_tables(tiny, head)
    feat = head.module.fuse(taps[:, :-1])
    shallow_out = head.module(feat, toks[:, 1:], emb, rows)[0]
    np.testing.assert_array_equal(np.asarray(deep.module(feat, toks[:, 1:], emb, rows)[0]), np.asarray(shallow_out))
    # training moves the new layers off the identity; then the cached forward (in two chunks) equals the uncached one
    moved = {k: np.asarray(v) + (0.05 * np.random.default_rng(3).standard_normal(np.shape(v)) if "block" in k else 0)
             for k, v in deep.params().items()}
    deep = rj.heads.from_flat(deep.config, moved)
    dm = deep.module
    full = np.asarray(dm(feat, toks[:, 1:], emb, rows)[0])
    assert np.abs(full - np.asarray(shallow_out)).max() > 1e-2  # the deeper layers now matter
    cache = init_cache(deep.config, 2, 16)
    assert cache.k.shape[0] == 3
    a, _, cache = dm(feat[:, :5], toks[:, 1:6], emb, rows, cache=cache, lengths=jnp.zeros((2,), jnp.int32))
    b, _, _ = dm(feat[:, 5:], toks[:, 6:], emb, rows, cache=cache, lengths=jnp.full((2,), 5, jnp.int32))
    np.testing.assert_allclose(np.concatenate([np.asarray(a), np.asarray(b)], 1), full, atol=1e-4)
    # a saved deeper head loads with its depth and the same logits
    deep.save(str(tmp_path / "deep"))
    back = rj.load(str(tmp_path / "deep"))
    assert back.config.depth == 3
    np.testing.assert_array_equal(np.asarray(back.module(feat, toks[:, 1:], emb, rows)[0]), full)
    with pytest.raises(ValueError, match="depth must be an integer >= the head's depth 3"):
        rj.heads.deepen(deep, 2)
    with pytest.raises(ValueError, match="depth is a number of decoder layers >= 1"):
        rj.heads.new_head(tiny, depth=0)


def _numpy_alpha(tiny, head, fs, steps, draft_temperature=0.8, sft=None, shift=1.0):
    """Sum_v min(p, q_i) recomputed with NumPy from uncached forwards and an explicit fed-back loop. With `sft`, p is
    exact SSS's p~ = softmax_D((l_ref + shift (l_r - l_sft)) / 0.8), l_r / l_sft the heads on true features."""
    emb, rows = th.target_tables(tiny, head)
    hm = head.module
    ids = np.asarray(head.config.token_ids)
    sums, counts = np.zeros(steps), np.zeros(steps)

    def true_logits(h, feat, toks, length):  # every slot's logits on true features, one uncached forward
        cache = init_cache(h.config, 1, 64)
        return np.asarray(h.module(feat[:, :length - 1], toks[:, 1:length], emb, rows, cache=cache,
                                   lengths=jnp.zeros((1,), jnp.int32))[0][0], np.float64)

    for n in range(len(fs)):
        length, plen = int(fs.lengths[n]), int(fs.prompt_lens[n])
        toks = jnp.asarray(fs.tokens[n:n + 1, :length])
        logits, _, taps = tiny.module(toks, taps=head.config.taps)
        p_full = np.asarray(jax.nn.softmax(logits[0] / 0.8, axis=-1), np.float64)
        feat = hm.fuse(taps)
        if sft is not None:  # p~ over D at slot u (position u + 1), in place of the target's p
            shifted = np.asarray(logits[0], np.float64)[1:length, ids] + shift * (
                true_logits(head, feat, toks, length) - true_logits(sft, sft.module.fuse(taps), toks, length))
            e = np.exp((shifted - shifted.max(axis=1, keepdims=True)) / 0.8)
            p_full = np.zeros((length, tiny.config.vocab_size))
            p_full[1:, ids] = e / e.sum(axis=1, keepdims=True)
        for s0 in range(max(plen - 2, 0), length - 2):
            cache = init_cache(head.config, 1, 64)
            lg, h, cache = hm(feat[:, :s0 + 1], toks[:, 1:s0 + 2], emb, rows, cache=cache,
                              lengths=jnp.zeros((1,), jnp.int32))
            lg, a = lg[:, -1:], h[:, -1:]
            for j in range(1, steps + 1):
                slot = s0 + j - 1
                if slot + 2 >= length:
                    break
                if j > 1:
                    lg, a, cache = hm(a, toks[:, slot + 1:slot + 2], emb, rows, cache=cache,
                                      lengths=jnp.full((1,), slot, jnp.int32))
                q = np.asarray(jax.nn.softmax(lg[0, 0] / draft_temperature), np.float64)
                sums[j - 1] += np.minimum(p_full[slot + 1][ids], q).sum()
                counts[j - 1] += 1
    return sums / counts


def test_closed_form_acceptance_matches_numpy(tiny, records):
    head = rj.heads.new_head(tiny, taps=(1, 2), token_ids=list(range(V - 8)), warm_start=False, seed=5)
    fs = th.extract_features(tiny, records[:6], head.config.taps, 0.8, width=32, batch_size=4, progress=False)
    got = th.evaluate_acceptance(tiny, head, fs, steps=3, temperature=0.8, batch_size=4)
    want = _numpy_alpha(tiny, head, fs, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)
    # a proposal at another temperature (the engine's draft_temperature): only q changes
    sharp = th.evaluate_acceptance(tiny, head, fs, steps=3, temperature=0.8, batch_size=4, draft_temperature=0.5)
    want_sharp = _numpy_alpha(tiny, head, fs, 3, draft_temperature=0.5)
    np.testing.assert_allclose(sharp, want_sharp, atol=2e-3)
    assert np.abs(np.asarray(sharp) - np.asarray(got)).max() > 0.01
    # calibration: the scale of the NumPy-best proposal, each row's alpha the NumPy one at scale * T
    best, rows = th.calibrate_proposal(tiny, head, fs, scales=(0.625, 1.0), steps=3, temperature=0.8, batch_size=4)
    assert [r["draft_temperature"] for r in rows] == [0.5, 0.8]
    np.testing.assert_allclose(rows[0]["alpha"], want_sharp, atol=2e-3)
    np.testing.assert_allclose(rows[1]["alpha"], want, atol=2e-3)
    assert best == (0.625 if want_sharp.mean() > want.mean() else 1.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        th.calibrate_proposal(tiny, head, fs, scales=(0.0,))


def test_closed_form_sss_acceptance_matches_numpy(tiny, records):
    """Exact SSS's closed-form acceptance: the draft's proposal against p~ built from both heads on true features."""
    ids = list(range(V - 8))
    draft = rj.heads.new_head(tiny, taps=(1, 2), token_ids=ids, seed=5)
    sft = rj.heads.new_head(tiny, taps=(1, 2), token_ids=ids, seed=6)
    fs = th.extract_features(tiny, records[:4], draft.config.taps, 0.8, width=32, batch_size=4, progress=False)
    got = th.evaluate_shifted_acceptance(tiny, draft, sft, fs, steps=2, temperature=0.8, shift=1.5, batch_size=4,
                                         draft_temperature=0.6)
    want = _numpy_alpha(tiny, draft, fs, 2, draft_temperature=0.6, sft=sft, shift=1.5)
    np.testing.assert_allclose(got, want, atol=2e-3)
    # not the plain (target) acceptance: p~ moved
    plain = _numpy_alpha(tiny, draft, fs, 2, draft_temperature=0.6)
    assert np.abs(np.asarray(got) - plain).max() > 0.01
    best, rows = th.calibrate_proposal(tiny, draft, fs, scales=(0.75, 1.0), steps=2, batch_size=4, sft=sft,
                                       shift=1.5)
    np.testing.assert_allclose(rows[0]["alpha"], got, atol=1e-6)
    other = rj.heads.new_head(tiny, taps=(0, 2), token_ids=ids, seed=7)
    with pytest.raises(ValueError, match="same taps and draft vocabulary"):
        th.evaluate_shifted_acceptance(tiny, draft, other, fs)


def test_feature_sets_concatenate_row_for_row(tiny, records):
    """Two extractions joined (train_heads.py's several sample files) equal one extraction of all the records; parts
    with other taps are refused."""
    whole = th.extract_features(tiny, records[:6], (1, 2), 0.8, width=32, batch_size=4, progress=False)
    parts = [th.extract_features(tiny, records[i:j], (1, 2), 0.8, width=32, batch_size=4, progress=False)
             for i, j in ((0, 2), (2, 6))]
    joined = th.FeatureSet.concat(parts)
    for name in th.FeatureSet.ARRAYS:
        np.testing.assert_allclose(np.asarray(getattr(joined, name), np.float32),
                                   np.asarray(getattr(whole, name), np.float32), atol=2e-3, err_msg=name)
    other = th.extract_features(tiny, records[:2], (0, 2), 0.8, width=32, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="same width, taps, temperature and target"):
        th.FeatureSet.concat([parts[0], other])


def test_feature_cache_reuses_rows_in_any_order(tiny, records, tmp_path):
    """scripts/train_heads.py's feature cache: a second call with more records, in another order, extracts only the
    new ones and returns every record's row where a fresh extraction puts it."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "train_heads_script", os.path.join(os.path.dirname(__file__), "..", "scripts", "train_heads.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = str(tmp_path / "feat.npz")
    script.features(tiny, records[:8:2], (1, 2), 0.8, path, 32)
    order = records[3:8] + records[:3]
    got = script.features(tiny, order, (1, 2), 0.8, path, 32)
    want = th.extract_features(tiny, order, (1, 2), 0.8, width=32, batch_size=4, progress=False)
    for name in th.FeatureSet.ARRAYS:
        np.testing.assert_allclose(np.asarray(getattr(got, name), np.float32),
                                   np.asarray(getattr(want, name), np.float32), atol=2e-3, err_msg=name)
    assert len(th.FeatureSet.load(path)) == len(order)


def test_distill_then_dpo(tiny, records, tmp_path):
    taps = (0, 1, 2)
    fs = th.extract_features(tiny, records, taps, 0.8, width=32, batch_size=16, progress=False)
    head = rj.heads.new_head(tiny, taps=taps, token_ids=list(range(V)), warm_start=True, seed=0)
    before = th.evaluate_acceptance(tiny, head, fs, steps=3)
    cfg = th.HeadTrainConfig(steps=60, batch_size=16, learning_rate=3e-3, warmup=5, ttt_steps=3, progress=False,
                             output=str(tmp_path / "sft"))
    sft, log = th.train_head(tiny, head, fs, cfg)
    after = th.evaluate_acceptance(tiny, sft, fs, steps=3)
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)
    assert (tmp_path / "sft" / "metrics.jsonl").exists()

    # preference: rows with more even tokens in the response are "chosen"
    score = np.asarray([np.mean([t % 2 == 0 for t in r["response_ids"]]) for r in records])
    order = np.argsort(-score)
    pairs = np.stack([order[:16], order[-16:][::-1]], axis=1)
    dcfg = th.HeadTrainConfig(steps=30, batch_size=8, learning_rate=2e-3, warmup=3, ttt_steps=2, beta=0.1,
                              progress=False)
    aligned, dlog = th.train_head(tiny, sft, fs, dcfg, mode="dpo", reference=sft, pairs=pairs)
    assert dlog[-1]["margin"] > 0.5 and dlog[-1]["reward_accuracy"] > 0.8, dlog[-1]
    # the saved heads round-trip exactly
    aligned.save(str(tmp_path / "aligned"))
    again = rj.load(str(tmp_path / "aligned"))
    for k, v in aligned.params().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(again.params()[k]))


def test_feature_noise_is_relative_to_each_tap():
    taps = np.stack([np.full((2, 3, 64), 0.01), np.full((2, 3, 64), 50.0)], axis=2).astype(np.float32)  # [B,S,n,E]
    noisy = np.asarray(th.noisy_taps(jnp.asarray(taps), jax.random.key(0), 0.2))
    rel = (noisy - taps) / np.abs(taps)  # rms of a constant vector = its value
    assert np.all(np.abs(rel) <= 0.2 + 1e-6)
    np.testing.assert_allclose(rel.std(), 0.2 / np.sqrt(3), rtol=0.1)  # U(-0.2, 0.2): s.d. 0.115; 768 draws
    assert abs(rel.mean()) < 0.02


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_resume_is_bit_exact(tiny, records, tmp_path, noise):
    taps = (1, 2)
    fs = th.extract_features(tiny, records[:24], taps, 0.8, width=32, batch_size=8, progress=False)
    head = rj.heads.new_head(tiny, taps=taps, token_ids=list(range(V)), seed=2)
    base = dict(steps=8, batch_size=8, learning_rate=1e-3, warmup=2, ttt_steps=2, progress=False, log_every=1,
                feature_noise=noise)
    full, _ = th.train_head(tiny, head, fs, th.HeadTrainConfig(**base, output=str(tmp_path / "a")))
    th.train_head(tiny, head, fs, th.HeadTrainConfig(**base, output=str(tmp_path / "b"), stop_after=5))
    resumed, _ = th.train_head(tiny, head, fs, th.HeadTrainConfig(**base, output=str(tmp_path / "b"), resume=True))
    for k, v in full.params().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(resumed.params()[k]))
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    if noise:  # the noise reaches the loss: the same run without it ends elsewhere
        clean, _ = th.train_head(tiny, head, fs, th.HeadTrainConfig(**dict(base, feature_noise=0.0)))
        assert any(not np.array_equal(np.asarray(v), np.asarray(clean.params()[k])) for k, v in full.params().items())
