"""Autoregressive decoding: greedy parity with transformers' generate, sampling laws, seeds, buckets, errors."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.decoding import common
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path, torch_model = tiny_checkpoints["llama_gqa_llama3rope"]
    return rj.load(path), torch_model


def _hf_greedy(torch_model, prompt, n):
    import torch
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "gpt2", "opt350m_style"])
def test_greedy_equals_transformers_ragged_batch(tiny_checkpoints, name):
    path, torch_model = tiny_checkpoints[name]
    lm = rj.load(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, VOCAB, n).tolist() for n in (3, 11, 7)]
    out = rj.generate(lm, prompts, max_new_tokens=12, temperature=0.0, eos=[])
    assert out.tokens.shape == (3, 12) and out.tokens.dtype == np.int32
    assert out.texts is None and list(out.lengths) == [12, 12, 12]
    for row, prompt in enumerate(prompts):
        assert out.tokens[row].tolist() == _hf_greedy(torch_model, prompt, 12), f"row {row}"


def test_eos_stops_rows_and_is_counted(llama):
    lm, torch_model = llama
    prompt = [5, 9, 17, 33]
    ref = _hf_greedy(torch_model, prompt, 10)
    stop = ref[3]  # make the 4th generated token an EOS
    out = rj.generate(lm, [prompt, [7, 7]], max_new_tokens=10, temperature=0.0, eos=[stop, 95])
    first = ref.index(stop) + 1
    assert out.lengths[0] == first
    assert out.tokens[0, :first].tolist() == ref[:first]
    assert (out.tokens[0, first:] == -1).all()


def test_first_token_law_after_each_filter(llama):
    """Over 20k rows the first token's frequencies match softmax(logits / T) after the filter (5 sigma per cell)."""
    lm, _ = llama
    prompt = [3, 14, 15, 92, 65]
    logits = np.asarray(lm.logits([prompt]))[0, -1].astype(np.float64)
    n = 20000
    for kw in [dict(), dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2)]:
        t = 0.7
        z = logits / t
        p = np.exp(z - z.max())
        p /= p.sum()
        if "top_k" in kw:
            p[np.argsort(-p)[kw["top_k"]:]] = 0
        if "top_p" in kw:
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            p[order[before >= kw["top_p"]]] = 0
        if "min_p" in kw:
            p[p < kw["min_p"] * p.max()] = 0
        p /= p.sum()
        out = rj.generate(lm, [prompt] * n, max_new_tokens=1, temperature=t, eos=[], seed=1, **kw)
        freq = np.bincount(out.tokens[:, 0], minlength=VOCAB) / n
        tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-9
        assert np.all(np.abs(freq - p) <= tol), kw
        assert np.all(freq[p == 0] == 0), kw


def test_seed_reproducible_and_rows_independent_of_batch(llama):
    lm, _ = llama
    a = rj.generate(lm, [[4, 5, 6], [7, 8]], max_new_tokens=8, seed=3, eos=[])
    b = rj.generate(lm, [[4, 5, 6], [7, 8]], max_new_tokens=8, seed=3, eos=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = rj.generate(lm, [[4, 5, 6], [7, 8], [9, 10, 11, 12], [1]], max_new_tokens=8, seed=3, eos=[])
    np.testing.assert_array_equal(c.tokens[:2], a.tokens)
    d = rj.generate(lm, [[4, 5, 6], [7, 8]], max_new_tokens=8, seed=4, eos=[])
    assert not np.array_equal(d.tokens, a.tokens)


def test_same_bucket_does_not_recompile(llama):
    lm, _ = llama
    rj.generate(lm, [[1, 2, 3]], max_new_tokens=5, temperature=0.0, eos=[])
    before = common.COMPILED.compiles
    out = rj.generate(lm, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=5, temperature=0.0, eos=[])
    assert common.COMPILED.compiles == before and out.stats["compile_s"] == 0.0
    rj.generate(lm, [list(range(1, 20))], max_new_tokens=5, temperature=0.0, eos=[])  # bucket 32
    assert common.COMPILED.compiles == before + 1


def test_bad_input(llama):
    lm, _ = llama
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        rj.generate(lm, [[]])
    with pytest.raises(ValueError, match="prompts is empty"):
        rj.generate(lm, [])
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        rj.generate(lm, [list(range(1, 90))], max_new_tokens=64)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        rj.generate(lm, [[1, 2]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        rj.generate(lm, [[1, 2]], top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be"):
        rj.generate(lm, [[1, 2]], top_k=0)
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        rj.generate(lm, [[1, 2]], method="beam")
    with pytest.raises(ValueError, match="has no tokenizer"):
        rj.generate(lm, ["hello"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rj.generate(lm, [[1, VOCAB + 3]])
