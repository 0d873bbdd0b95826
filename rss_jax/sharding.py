"""Sharding by logical axis names.

Every parameter gets logical axis names (batch, embed, heads, kv_heads, mlp, vocab, layers); one rules object maps
them to mesh axes (data, fsdp, tensor). The same code runs on one CPU, 8 simulated CPU devices, a GPU or a TPU pod:
on a multi-host pod call `initialize_distributed()` on every host first, then build the same mesh everywhere.
A dimension that the mesh axis does not divide is replicated rather than failing.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None))

# logical axes of each parameter, by the last component of its path
PARAM_AXES = {
    "embed_tokens": ("vocab", "embed"), "lm_head": ("vocab", "embed"), "wte": ("vocab", "embed"),
    "wpe": (None, "embed"), "embed_positions": (None, "embed"),
    "wq": ("layers", "embed", "heads"), "wk": ("layers", "embed", "kv_heads"), "wv": ("layers", "embed", "kv_heads"),
    "bq": ("layers", "heads"), "bk": ("layers", "kv_heads"), "bv": ("layers", "kv_heads"),
    "wo": ("layers", "heads", "embed"), "w_o": ("layers", "heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"), "w_down": ("layers", "mlp", "embed"),
    "w_fc": ("layers", "embed", "mlp"), "w_fc1": ("layers", "embed", "mlp"), "b_fc": ("layers", "mlp"),
    "b_fc1": ("layers", "mlp"), "w_proj": ("layers", "mlp", "embed"), "w_fc2": ("layers", "mlp", "embed"),
    "w_qkv": ("layers", "embed", "heads"), "b_qkv": ("layers", "heads"),
}


@dataclasses.dataclass(frozen=True)
class Rules:
    rules: tuple = DEFAULT_RULES

    def mesh_axes(self, logical: str | None):
        return dict(self.rules).get(logical) if logical else None


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; -1 takes what the other axes leave."""
    devices = np.array(devices if devices is not None else jax.devices())
    n = devices.size
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {n} devices")
    return Mesh(devices.reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape, logical: tuple, mesh: Mesh, rules: Rules = Rules()) -> PartitionSpec:
    parts = []
    for dim, name in zip(shape, logical):
        axes = rules.mesh_axes(name)
        parts.append(axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None)
    return PartitionSpec(*parts)


def param_sharding(path: str, shape, mesh: Mesh, rules: Rules = Rules()) -> NamedSharding:
    logical = PARAM_AXES.get(path.split(".")[-1], (None,) * len(shape))
    if len(logical) != len(shape):
        logical = (None,) * len(shape)
    return NamedSharding(mesh, spec_for(shape, logical, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = Rules()) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(rules.mesh_axes("batch"), *([None] * (ndim - 1))))


def shard_params(flat: dict, mesh: Mesh, rules: Rules = Rules()) -> dict:
    """Place every array of a flat {path: array} dict on the mesh by its logical axes."""
    return {k: jax.device_put(v, param_sharding(k, v.shape, mesh, rules)) for k, v in flat.items()}


def initialize_distributed(**kwargs):
    """Multi-host start-up (TPU pods, multi-node GPU): the same script on every host."""
    jax.distributed.initialize(**kwargs)
