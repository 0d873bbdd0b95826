"""Flax NNX model families. `build_model` picks the class from the config's family."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rss_jax.models.config import ConfigError, ModelConfig, config_from_hf, read_hf_config
from rss_jax.models.gpt2 import GPT2
from rss_jax.models.llama import Llama
from rss_jax.models.opt import OPT

MODEL_CLASSES = {"llama": Llama, "gpt2": GPT2, "opt": OPT}


def model_class(config: ModelConfig):
    try:
        return MODEL_CLASSES[config.family]
    except KeyError:
        raise ConfigError(f"unknown model family {config.family!r}; known: {sorted(MODEL_CLASSES)}") from None


def build_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """A randomly initialised model (std 0.02 normals, unit norms)."""
    return model_class(config)(config, rngs=nnx.Rngs(seed), dtype=dtype)


def abstract_model(config: ModelConfig, dtype=jnp.float32):
    """The model's structure with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: build_model(config, 0, dtype))


__all__ = ["ModelConfig", "ConfigError", "config_from_hf", "read_hf_config", "build_model", "abstract_model",
           "Llama", "GPT2", "OPT", "MODEL_CLASSES"]
