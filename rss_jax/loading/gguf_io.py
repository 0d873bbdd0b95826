"""GGUF files (llama.cpp): configuration from the metadata, tensors dequantised to float32 by the `gguf` package.

llama.cpp's converter permutes the rows of the Llama q and k projections (to interleave rotary pairs); we undo it so
that the weights match the Hugging Face layout our rotary embedding uses.
"""
from __future__ import annotations

import os

import numpy as np

from rss_jax.loading.names import CheckpointError
from rss_jax.models.config import ConfigError, ModelConfig

SUPPORTED_ARCHS = ("llama", "qwen2")


def open_gguf(path: str):
    import gguf
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it is truncated or "
                              "corrupt") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return f.parts[f.data[0]].tolist()[0] if f.data else default


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden = int(g("embedding_length"))
    n_heads = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_heads))
    names = {t.name for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(emb.shape[-1]) if int(emb.shape[0]) == hidden else int(emb.shape[0])
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = _field(reader, key)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    scaling = ()
    if g("rope.scaling.type") == "linear":
        scaling = (("factor", float(g("rope.scaling.factor"))), ("rope_type", "linear"))
    return ModelConfig(
        family="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")), num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=int(g("attention.key_length", hidden // n_heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling, tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, activation="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(eos),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"), model_type=arch)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation of a [out, ...] weight or [out] bias."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf(reader, config: ModelConfig, path: str):
    """Yield (name, float32 array in Hugging Face layout) for every tensor."""
    from gguf import quants
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {t.name!r} uses quantisation {t.tensor_type.name}, which the "
                                  f"gguf package cannot dequantise ({e})") from e
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if arch == "llama" and ".attn_q." in t.name:
            arr = unpermute_rows(arr, config.num_heads)
        elif arch == "llama" and ".attn_k." in t.name:
            arr = unpermute_rows(arr, config.num_kv_heads)
        yield t.name, arr
