"""Orbax training checkpoints: params, optimizer state, step, PRNG key and data position, written atomically.

Layout: `<output>/checkpoints/step_00000012/` holding `state/` (one Orbax StandardCheckpointer tree: params by name,
optimizer leaves by index, the PRNG key data, step and data position) and `meta.json` (step, data position, run
fingerprint). A checkpoint is assembled under `.tmp-step_...` and renamed into place only when complete, so an
interrupted save never leaves a folder that `latest_checkpoint` would pick up.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
from flax import nnx

from rss_jax.loading.names import flatten, unflatten
from rss_jax.loading.orbax_io import atomic_folder, save_tree
from rss_jax.sharding import to_host

STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to the run that tries to resume from it."""


def checkpoint_dir(output: str) -> str:
    return os.path.join(output, "checkpoints")


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints, oldest first."""
    root = checkpoint_dir(output)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output: str) -> str | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def _tree(params, opt_state, rng_key, step: int, data_position: int) -> dict:
    return {
        "params": flatten(nnx.to_pure_dict(params)),
        "opt": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))},
        "rng": np.asarray(to_host(jax.random.key_data(rng_key))),
        "step": np.asarray(step, np.int32),
        "data_position": np.asarray(data_position, np.int64),
    }


def save_checkpoint(output: str, step: int, params, opt_state, rng_key, data_position: int, meta: dict,
                    keep: int = 2) -> str:
    """Write checkpoint `step` atomically and prune all but the newest `keep` (keep <= 0 keeps every one)."""
    final = os.path.join(checkpoint_dir(output), f"step_{step:08d}")
    from rss_jax.sharding import barrier, is_main_process
    with atomic_folder(final) as tmp:  # assembled under .tmp-step_..., which list_checkpoints never picks up
        # arrays as they live (sharded over a mesh, or on one device): Orbax writes each process's own shards
        save_tree(os.path.join(tmp, "state"), _tree(params, opt_state, rng_key, step, data_position))
        if is_main_process():
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta, step=int(step), data_position=int(data_position)), f, indent=1)
    if keep > 0 and is_main_process():
        for _, old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier("checkpoint pruned " + final)
    return final


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def _abstract(x):
    """The restore target of one leaf: its shape, dtype and sharding (the current run's layout, whatever the layout
    of the run that saved it)."""
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def restore_checkpoint(path: str, params_template, opt_template, rng_template):
    """-> (params nnx.State, opt_state, rng key, step, data_position), shaped and sharded like the templates: a run
    on another mesh or process count restores each array straight into its own layout."""
    import orbax.checkpoint as ocp
    tree = _tree(params_template, opt_template, rng_template, 0, 0)
    host = {k: tree.pop(k) for k in ("rng", "step", "data_position")}  # small host values restore as NumPy
    like = dict(jax.tree.map(_abstract, tree), **host)
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(path, "state"), like)
    params = jax.tree.map(lambda x: x, params_template)  # a fresh State with the template's structure
    nnx.replace_by_pure_dict(params, unflatten(dict(tree["params"])))
    leaves = [tree["opt"][f"{i:05d}"] for i in range(len(jax.tree.leaves(opt_template)))]
    opt_state = jax.tree.unflatten(jax.tree.structure(opt_template), leaves)
    rng = jax.random.wrap_key_data(np.asarray(tree["rng"]))
    meta = read_meta(path)
    return params, opt_state, rng, int(meta["step"]), int(meta["data_position"])
