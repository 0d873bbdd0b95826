"""`rss_jax.likelihood.response_nll` against transformers on PyTorch: the summed negative log-likelihood of each
response given its prompt, for ragged prompts and responses batched and padded together."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.likelihood import response_nll
from tests.conftest import VOCAB, torch_logits


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path, torch_model = tiny_checkpoints["llama_gqa_llama3rope"]
    return rj.load(path), torch_model


def _oracle(torch_model, prompt, response):
    logits = torch_logits(torch_model, [prompt + response])[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(response))


def test_matches_transformers_on_ragged_rows(llama):
    lm, torch_model = llama
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 9, 1, 20, 5)]
    responses = [rng.integers(0, VOCAB, n).tolist() for n in (7, 1, 30, 12, 0)]
    # batch 2: three batches, the last padded with an empty row; lengths bucket to 64
    nll, count = response_nll(lm, prompts, responses, batch_size=2)
    assert count.tolist() == [7, 1, 30, 12, 0]
    want = [_oracle(torch_model, p, r) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(nll, want, rtol=2e-5, atol=2e-4)
    assert nll[4] == 0.0


def test_long_rows_span_several_length_buckets(llama):
    """Rows of 20 to 120 tokens fall in two width buckets (64 and 128, the tiny model's whole context)."""
    lm, torch_model = llama
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (4, 50, 10)]
    responses = [rng.integers(0, VOCAB, n).tolist() for n in (16, 70, 118)]
    nll, count = response_nll(lm, prompts, responses, batch_size=2)
    want = [_oracle(torch_model, p, r) for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(nll, want, rtol=2e-5, atol=5e-4)
    # one bare prompt of ids with its response is one row, not one row per id
    one, n1 = response_nll(lm, prompts[0], responses[0])
    assert n1.tolist() == [16] and one[0] == pytest.approx(want[0], rel=2e-5)


def test_padding_entries_are_dropped_and_batch_size_does_not_matter(llama):
    lm, _ = llama
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, -1, -1], [9, 10]]
    a, ca = response_nll(lm, prompts, responses, batch_size=1)
    b, cb = response_nll(lm, prompts, [[6, 7, 8], [9, 10]], batch_size=4)
    assert ca.tolist() == cb.tolist() == [3, 2]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bad_input_is_refused(llama):
    lm, _ = llama
    with pytest.raises(ValueError, match="one response per prompt"):
        response_nll(lm, [[1, 2]], [[3], [4]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        response_nll(lm, [[1, 2]], [[VOCAB + 5]])
    with pytest.raises(ValueError, match="no tokenizer"):
        response_nll(lm, [[1, 2]], ["some text"])
    with pytest.raises(ValueError, match="batch_size"):
        response_nll(lm, [[1, 2]], [[3]], batch_size=0)
    with pytest.raises(ValueError, match="context of 128"):
        response_nll(lm, [[1] * 60], [[2] * 69])
