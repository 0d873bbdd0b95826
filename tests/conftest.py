"""Shared fixtures: tiny random transformers checkpoints saved as safetensors, built once per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

VOCAB = 96


def randomise(model, seed=0):
    """Give every parameter random values (norm weights near 1, everything else N(0, 0.1)), so that a dropped bias,
    a swapped norm or a transposed matrix shows in the logits."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def tiny_configs():
    """name -> (transformers config class name, kwargs)."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                max_position_embeddings=128)
    return {
        "llama_gqa_llama3rope": ("LlamaConfig", dict(base, num_attention_heads=4, num_key_value_heads=2,
                                                     rms_norm_eps=1e-5, tie_word_embeddings=False,
                                                     rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0,
                                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                                      "high_freq_factor": 4.0,
                                                                      "original_max_position_embeddings": 16})),
        "llama_mqa_tied": ("LlamaConfig", dict(base, num_attention_heads=4, num_key_value_heads=1,
                                               rms_norm_eps=1e-6, tie_word_embeddings=True)),
        "llama_mha_linear": ("LlamaConfig", dict(base, num_attention_heads=4, num_key_value_heads=4,
                                                 rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                  "factor": 2.0})),
        "mistral_head_dim": ("MistralConfig", dict(base, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                                   sliding_window=None)),
        "qwen2_bias": ("Qwen2Config", dict(base, num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=True)),
        "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)),
        "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                  pad_token_id=1)),
        "opt350m_style": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128,
                                            word_embed_proj_dim=16, do_layer_norm_before=False, pad_token_id=1)),
    }


def make_checkpoint(folder, name, seed=0):
    import torch
    import transformers
    cls_name, kwargs = tiny_configs()[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    randomise(model, seed)
    path = os.path.join(folder, name)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (folder, torch model) for every tiny family configuration."""
    folder = tmp_path_factory.mktemp("tiny_ckpts")
    return {name: make_checkpoint(str(folder), name, seed=i) for i, name in enumerate(tiny_configs())}


@pytest.fixture(scope="session")
def smollm_path():
    from rss_jax.loading import resolve_builtin
    return resolve_builtin("smollm2-135m-instruct")


def torch_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm():
    import rss_jax as rj
    return rj.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_torch(smollm_path):
    """transformers' own GGUF loader (dequantises the same file): the real-weights oracle."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the compiled loops it made (rss_jax's cache and JAX's own): the suite compiles
    hundreds of programs in one process, and keeping them all grows its memory until XLA's compiler can fail late in
    the run."""
    yield
    import gc

    import jax

    from rss_jax.decoding.common import COMPILED
    COMPILED.entries.clear()
    jax.clear_caches()
    gc.collect()
