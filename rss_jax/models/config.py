"""One model configuration for every family, read from a Hugging Face config.json or GGUF metadata.

The dataclass is frozen and hashable so that it can sit inside an NNX graphdef (a static jit argument).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

FAMILIES = ("llama", "gpt2", "opt")

# HF `model_type` -> our family. Llama-like models differ only by flags.
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm2": "llama",
    "gpt2": "gpt2",
    "opt": "opt",
}


class ConfigError(ValueError):
    """A checkpoint's configuration cannot be used (unknown architecture, unsupported option)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "gpt2" | "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable; () = none
    rope_scaling: tuple = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (q/k/v biases); GPT-2 and OPT have biases everywhere
    activation: str = "silu"  # llama: silu (gated); gpt2: gelu_new; opt: relu
    # OPT specifics
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None  # OPT-350m: 512 with hidden 1024 (project_in / project_out)
    final_layer_norm: bool = True
    position_offset: int = 0  # OPT: learned positions start at offset 2
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    model_type: str = ""
    # A trimmed output head (a draft's vocabulary, FR-Spec style): the sorted token ids the head scores. Logits of
    # every other id are -inf, so the model never proposes them. () = the full vocabulary.
    head_token_ids: tuple = ()

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (differs from hidden_size only for OPT with project_in/out)."""
        return self.word_embed_proj_dim or self.hidden_size

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["head_token_ids"] = list(self.head_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = _freeze(d.get("rope_scaling") or {})
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["head_token_ids"] = tuple(int(i) for i in d.get("head_token_ids") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_token_ids(ids, vocab_size: int, what: str = "head_token_ids"):
    """A draft vocabulary (trimmed heads, feature-draft heads): strictly increasing token ids in [0, vocab_size).
    Returns them as an int64 array; anything else is a ValueError naming the problem."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or ids.size == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= vocab_size:
        span = f" from {ids.min()} to {ids.max()}" if ids.size else ""
        raise ValueError(f"{what} must be distinct, increasing token ids in [0, vocab_size={vocab_size}); got "
                         f"{ids.size} ids{span}")
    return ids


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _eos_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(hf: dict, where: str) -> tuple[float, tuple]:
    """Read RoPE theta and scaling from either the v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`)
    spelling. Returns (theta, frozen scaling) where scaling is () for the default rotary embedding."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, ()
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return theta, ()
    if rope_type not in ("llama3", "linear"):
        raise ConfigError(
            f"{where}: rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3); "
            "dynamic NTK scaling changes with the sequence length and does not fit a static-shape KV cache")
    scaling["rope_type"] = rope_type
    return theta, _freeze(scaling)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dictionary."""
    model_type = hf.get("model_type")
    family = _MODEL_TYPES.get(model_type or "")
    if family is None:
        archs = hf.get("architectures")
        raise ConfigError(
            f"{where}: unknown architecture model_type={model_type!r} (architectures={archs}); "
            f"supported model types: {sorted(_MODEL_TYPES)}")
    eos = _eos_tuple(hf.get("eos_token_id"))
    common = dict(bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, pad_token_id=hf.get("pad_token_id"),
                  model_type=model_type)
    if family == "llama":
        n_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        theta, scaling = _rope_from_hf(hf, where)
        return ModelConfig(
            family="llama", vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hidden // n_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(model_type == "qwen2" or hf.get("attention_bias", False)),
            activation=hf.get("hidden_act", "silu"), **common)
    if family == "gpt2":
        hidden = hf["n_embd"]
        n_heads = hf["n_head"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden, num_layers=hf["n_layer"], num_heads=n_heads,
            num_kv_heads=n_heads, head_dim=hidden // n_heads, max_position_embeddings=hf["n_positions"],
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_word_embeddings=True,
            activation=hf.get("activation_function", "gelu_new"), **common)
    # opt
    hidden = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    proj = hf.get("word_embed_proj_dim")
    return ModelConfig(
        family="opt", vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"], num_heads=n_heads, num_kv_heads=n_heads, head_dim=hidden // n_heads,
        max_position_embeddings=hf["max_position_embeddings"], norm_eps=1e-5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=hf.get("activation_function", "relu"),
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=proj if proj and proj != hidden else None,
        final_layer_norm=bool(hf.get("do_layer_norm_before", True)) and not hf.get("_remove_final_layer_norm", False),
        position_offset=2, **common)


def read_hf_config(folder: str) -> tuple[ModelConfig, dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs one")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return config_from_hf(hf, where=path), hf
