"""Hugging Face checkpoint folders: config.json plus model.safetensors or a sharded model.safetensors.index.json.

Pickle-based files (.bin, .pt, .pth, .ckpt) are refused, never unpickled.
"""
from __future__ import annotations

import json
import os

import numpy as np

from rss_jax.loading.names import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: str):
    raise CheckpointError(
        f"{path}: this is a pickle-based PyTorch checkpoint, which rss_jax never unpickles (it can run arbitrary "
        "code). Convert it to safetensors first, e.g. in Python: "
        "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`")


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a checkpoint folder, in order; clear errors for missing or pickle-only checkpoints."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(folder, f) for f in files]
        for p in paths:
            if not os.path.exists(p):
                raise CheckpointError(f"{index}: names shard {os.path.basename(p)} which is missing from {folder}")
        return paths
    if os.path.exists(single):
        return [single]
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, f) for f in others]
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        refuse_pickle(os.path.join(folder, pickles[0]))
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def iter_safetensors(path: str):
    """Yield (name, float32 NumPy array) for every tensor of one .safetensors file."""
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="flax")
    except Exception as e:  # the library raises its own error type for truncated or corrupt headers
        raise CheckpointError(f"{path}: cannot read this safetensors file ({type(e).__name__}: {e}); "
                              "it is truncated or corrupt, re-download or re-save it") from e
    with handle as f:
        for name in f.keys():
            try:
                t = f.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}); the file is truncated or "
                                      "corrupt") from e
            yield name, np.asarray(t.astype("float32") if str(t.dtype) != "float32" else t)
