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
from rss_jax.report import public_mode

MARKER = "rss_jax.json"


def is_orbax_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; when the block ends normally it replaces `path` (one rename), and on
    any error it is removed, so an interrupted write never leaves a folder that looks complete.

    On several processes (`jax.process_count() > 1`) every process must enter it together: they share one temporary
    folder (process 0 creates it), each writes its part (Orbax writes each process's shards), and process 0 renames
    it once all have finished; files that are not shards should be written by process 0 only."""
    from rss_jax import sharding
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    multi = jax.process_count() > 1
    main = sharding.is_main_process()
    if multi:
        tmp = os.path.join(parent, ".tmp-" + os.path.basename(path) + "-shared")
        if main:
            os.makedirs(parent, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        sharding.barrier("atomic-open " + path)
    else:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
        public_mode(tmp, folder=True)  # mkdtemp's folder is private; the saved one should not be
    try:
        yield tmp
        sharding.barrier("atomic-written " + path)
        if main:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(tmp, path)
        sharding.barrier("atomic-renamed " + path)
    except BaseException:
        if main:
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
    from rss_jax.sharding import is_main_process
    with atomic_folder(path) as tmp:
        save_tree(os.path.join(tmp, "params"), {k: np.asarray(v) for k, v in state_dict.items()})
        if is_main_process():
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


def restore(path: str, targets: dict, shardings: dict | None = None, dtype=np.float32) -> dict:
    """targets: {param path: ShapeDtypeStruct}; returns {param path: float32 NumPy array}, or with `shardings`
    ({param path: Sharding}) arrays of `dtype` restored straight into those shardings (each process reads only its
    own shards; the saved layout does not matter)."""
    import orbax.checkpoint as ocp
    if shardings is None:
        abstract = {k: jax.ShapeDtypeStruct(v.shape, np.float32) for k, v in targets.items()}
    else:
        abstract = {k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=shardings[k]) for k, v in targets.items()}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(os.path.abspath(path), "params"), abstract)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the Orbax parameters ({type(e).__name__}: {e}); the checkpoint "
                              "is corrupt or does not match its rss_jax.json") from e
    if shardings is not None:
        return dict(restored)
    return {k: np.asarray(v) for k, v in restored.items()}
