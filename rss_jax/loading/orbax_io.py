"""Orbax save and restore of converted weights, so a converted model reloads without re-conversion.

Layout of a saved folder: `rss_jax.json` (our ModelConfig), `params/` (an Orbax StandardCheckpointer tree) and the
tokenizer files when the model has a tokenizer. The folder is written under a temporary name and renamed at the end,
so an interrupted save leaves nothing that looks like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from rss_jax.loading.names import CheckpointError
from rss_jax.models.config import ModelConfig

MARKER = "rss_jax.json"


def is_orbax_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; when the block ends normally it replaces `path` (one rename), and on
    any error it is removed, so an interrupted write never leaves a folder that looks complete."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tree(folder: str, tree) -> None:
    """Write a pytree of arrays with Orbax's StandardCheckpointer and wait until it is on disk."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder, tree)
        ckptr.wait_until_finished()


def save(path: str, config: ModelConfig, state_dict: dict, tokenizer=None, overwrite: bool = False):
    """state_dict: the flat {param path: array} of a model."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with atomic_folder(path) as tmp:
        save_tree(os.path.join(tmp, "params"), {k: np.asarray(v) for k, v in state_dict.items()})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"format": 1, "config": config.to_json()}, f, indent=1)
    return path


def read_config(path: str) -> ModelConfig:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return ModelConfig.from_json(json.load(f)["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(path, MARKER)}: corrupt rss_jax checkpoint description ({e})") from e


def restore(path: str, targets: dict) -> dict:
    """targets: {param path: ShapeDtypeStruct}; returns {param path: float32 NumPy array}."""
    import orbax.checkpoint as ocp
    abstract = {k: jax.ShapeDtypeStruct(v.shape, np.float32) for k, v in targets.items()}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(os.path.abspath(path), "params"), abstract)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the Orbax parameters ({type(e).__name__}: {e}); the checkpoint "
                              "is corrupt or does not match its rss_jax.json") from e
    return {k: np.asarray(v) for k, v in restored.items()}
