"""Parity of every model family with transformers (PyTorch) and of the cached forward with the uncached one."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax.cache import init_cache
from tests.conftest import VOCAB, tiny_configs, torch_logits

NAMES = list(tiny_configs())


def _tokens(seed, shape=(2, 11)):
    return np.random.default_rng(seed).integers(2, VOCAB, size=shape)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny_checkpoints, name):
    path, torch_model = tiny_checkpoints[name]
    lm = rj.load(path)
    tokens = _tokens(1)
    ours = np.asarray(lm.logits(tokens))
    ref = torch_logits(torch_model, tokens)
    assert ours.shape == ref.shape == (2, 11, VOCAB)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert lm.tokenizer is None and lm.vocab_size == VOCAB


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "gpt2", "opt350m_style", "qwen2_bias"])
def test_cached_forward_in_pieces_equals_uncached(tiny_checkpoints, name):
    """Prefill 4 tokens, then 3 tokens one by one, then a 5-token block: every row equals the uncached forward."""
    lm = rj.load(tiny_checkpoints[name][0])
    tokens = jnp.asarray(_tokens(2, (2, 12)), dtype=jnp.int32)
    full = np.asarray(lm.logits(tokens))
    model = lm.module
    cache = init_cache(lm.config, batch=2, capacity=16)
    lengths = jnp.zeros((2,), jnp.int32)
    pieces = []
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 12)]:
        logits, cache = model(tokens[:, a:b], cache=cache, lengths=lengths)
        lengths = lengths + (b - a)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


def test_cached_forward_ragged_rows_and_rollback(tiny_checkpoints):
    """Rows at different lengths in one cache; stale slots after a 'rejected' block are never seen."""
    lm = rj.load(tiny_checkpoints["llama_mqa_tied"][0])
    model = lm.module
    rng = np.random.default_rng(3)
    seq0, seq1 = rng.integers(2, VOCAB, 9), rng.integers(2, VOCAB, 6)
    cache = init_cache(lm.config, batch=2, capacity=24)
    # right-padded prefill: row 1 has 6 real tokens, the padding writes garbage at slots 6..8
    prefill = jnp.asarray(np.stack([seq0, np.concatenate([seq1, [5, 5, 5]])]), jnp.int32)
    _, cache = model(prefill, cache=cache, lengths=jnp.zeros(2, jnp.int32))
    lengths = jnp.array([9, 6], jnp.int32)
    # a junk block written and then rolled back (lengths not advanced)
    junk = jnp.asarray(rng.integers(2, VOCAB, (2, 3)), jnp.int32)
    _, cache = model(junk, cache=cache, lengths=lengths)
    nxt = jnp.asarray(rng.integers(2, VOCAB, (2, 2)), jnp.int32)
    logits, cache = model(nxt, cache=cache, lengths=lengths)
    for row, seq in enumerate([seq0, seq1]):
        ref = np.asarray(lm.logits(np.concatenate([seq, np.asarray(nxt[row])])[None]))[0, -2:]
        np.testing.assert_allclose(np.asarray(logits[row]), ref, atol=1e-4, rtol=0)


def test_v4_rope_scaling_spelling_reads_the_same(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama_gqa_llama3rope"][0]
    dst = tmp_path / "v4"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = dict(params, type=params.pop("rope_type"))
    (dst / "config.json").write_text(json.dumps(cfg))
    a, b = rj.load(src), rj.load(str(dst))
    assert a.config == b.config
    assert a.config.rope_scaling_dict["rope_type"] == "llama3"


def test_sharded_safetensors_index(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM
    src, torch_model = tiny_checkpoints["qwen2_bias"]
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, safe_serialization=True, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    tokens = _tokens(4)
    np.testing.assert_allclose(np.asarray(rj.load(str(out)).logits(tokens)), torch_logits(torch_model, tokens),
                               atol=1e-3, rtol=0)


def test_bfloat16_load_error_reported(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama_gqa_llama3rope"]
    tokens = _tokens(5)
    f32 = np.asarray(rj.load(path).logits(tokens))
    lm16 = rj.load(path, dtype="bfloat16")
    assert lm16.params()["layers.wq"].dtype == jnp.bfloat16
    b16 = np.asarray(lm16.logits(tokens))
    assert b16.dtype == np.float32
    err = np.abs(b16 - f32).max()
    print(f"bf16 vs f32 max abs logit error: {err:.4f} (logit scale {np.abs(f32).max():.2f})")
    assert 0 < err < 0.05 * np.abs(f32).max()


def test_orbax_roundtrip(tiny_checkpoints, tmp_path):
    path, torch_model = tiny_checkpoints["opt350m_style"]
    lm = rj.load(path)
    out = lm.save(str(tmp_path / "converted"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    back = rj.load(out)
    assert back.config == lm.config
    tokens = _tokens(6)
    np.testing.assert_array_equal(np.asarray(back.logits(tokens)), np.asarray(lm.logits(tokens)))
    with pytest.raises(FileExistsError):
        lm.save(out)


def test_gguf_unpermute_inverts_llama_cpp_permutation():
    from rss_jax.loading.gguf_io import unpermute_rows

    def llama_cpp_permute(w, n_head):  # the converter's row order, written from its description
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).normal(size=(24, 5))
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
