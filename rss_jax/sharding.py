"""Sharding on JAX's own SPMD machinery: logical axes, one rules object, meshes, multi-process start-up.

* Every parameter has logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``layers`` or
  None), declared beside its module in a ``LOGICAL_AXES`` table (rss_jax/models/llama.py, gpt2.py, opt.py, the
  reward heads and the feature-draft heads). `Rules` maps logical names to the mesh axes ``data``, ``fsdp`` and
  ``tensor``; the batch lives on ``("data", "fsdp")``.
* A mesh axis that does not divide a dimension it is asked to shard is an error (`ShardingError`) naming the
  parameter, the dimension and the mesh axis; nothing is silently replicated. Attention heads and KV heads must be
  divisible by the ``tensor`` axis.
* Meshes are built with `jax.make_mesh` and axis type **Auto** on every axis: we pin where the weights, the batch
  and the KV caches live and let the compiler propagate the rest. Explicit mode (the default of recent jax) would
  make every intermediate's sharding part of its type, which our loops (dynamic slices into caches, gathers of
  surviving rows) do not need and which would tie every method to one layout.
* Multi-process (TPU pods, multi-node GPU, several CPU processes): call `initialize()` on every process first, then
  build the same mesh everywhere. Weights are placed with `jax.make_array_from_callback` (each process fills only its
  own shards), host batches become global arrays the same way (`place`), and `to_host` reads any global array
  back on every process. `is_main_process()` says who writes outputs, metrics and logs.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


class ShardingError(ValueError):
    """A mesh that cannot hold an array in the layout the rules ask for."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axis (a name, a tuple of names, or None to replicate). Frozen and hashable.

    The defaults: batch over data and fsdp (data parallel and fully sharded data parallel), the model dimension of
    every weight over fsdp, heads / KV heads / MLP width / vocabulary over tensor (Megatron-style tensor parallel),
    the stacked layer axis replicated."""
    batch: object = ("data", "fsdp")
    embed: object = "fsdp"
    heads: object = "tensor"
    kv_heads: object = "tensor"
    mlp: object = "tensor"
    vocab: object = "tensor"
    layers: object = None

    def mesh_axes(self, logical: str | None):
        if logical is None:
            return None
        try:
            return getattr(self, logical)
        except AttributeError:
            raise ShardingError(f"unknown logical axis {logical!r}; known: "
                                f"{[f.name for f in dataclasses.fields(self)]}") from None


DEFAULT_RULES = Rules()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; -1 on `data` takes what the others leave.
    Axis type Auto (see the module docstring)."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(size, int) or size < 1:
            raise ShardingError(f"mesh axis {name} must be a positive integer, got {size!r}")
    if data == -1:
        if n % (fsdp * tensor):
            raise ShardingError(f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}; choose sizes whose "
                                f"product divides {n}")
        data = n // (fsdp * tensor)
    if not isinstance(data, int) or data < 1 or data * fsdp * tensor != n:
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not match the {n} devices; "
                            "the product of the axis sizes must equal the device count (data=-1 fills it)")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=auto, devices=devices)


def parse_mesh_sizes(text: str) -> dict:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}: axes data, fsdp, tensor; positive sizes, data=-1 takes the
    devices the others leave. ShardingError on anything else (checked against the devices by `make_mesh`)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (x.strip() for x in part.partition("="))
        try:
            size = int(value)
        except ValueError:
            size = None
        if name not in MESH_AXES or size is None or (size < 1 and not (name == "data" and size == -1)):
            raise ShardingError(f"bad mesh item {part!r}; write e.g. data=2,tensor=4 (axes {', '.join(MESH_AXES)}; "
                                "positive sizes, data=-1 takes the devices left)")
        sizes[name] = size
    if not sizes:
        raise ShardingError(f"empty mesh {text!r}; write e.g. data=2,tensor=4")
    return sizes


def parse_mesh(text: str, devices=None) -> Mesh:
    """'data=2,tensor=4' -> make_mesh(data=2, tensor=4) (data defaults to -1, fsdp and tensor to 1)."""
    return make_mesh(**parse_mesh_sizes(text), devices=devices)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _axes_name(axes) -> str:
    return axes if isinstance(axes, str) else " x ".join(axes)


def spec_for(name: str, shape, logical: tuple, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of array `name` with dimensions `shape` and logical axes `logical`; ShardingError when a
    mesh axis does not divide its dimension."""
    if len(logical) != len(shape):
        raise ShardingError(f"{name}: {len(logical)} logical axes {logical} for a {len(shape)}-d array {tuple(shape)}")
    parts, used = [], set()
    for i, (dim, axis) in enumerate(zip(shape, logical)):
        axes = rules.mesh_axes(axis)
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            # a mesh axis may shard one dimension only; size-1 axes are dropped (they shard nothing)
            names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
            used.update(names)
            size = _axis_size(mesh, names) if names else 1
            if size > 1 and dim % size:
                raise ShardingError(
                    f"cannot shard {name}: dimension {i} ({axis}, size {dim}) is not divisible by mesh axis "
                    f"{_axes_name(names)} of size {size}; use a mesh whose {_axes_name(names)} size divides {dim}, "
                    f"or replicate it with rss_jax.sharding.Rules({axis}=None)")
            axes = (names[0] if len(names) == 1 else names) if names else None
        parts.append(axes)
    return PartitionSpec(*parts)


def logical_axes_table(config) -> dict:
    """{parameter path: logical axes} of the model family of `config` (declared beside each module)."""
    from rss_jax.models import gpt2, llama, opt
    tables = {"llama": llama.LOGICAL_AXES, "gpt2": gpt2.LOGICAL_AXES, "opt": opt.LOGICAL_AXES}
    family = getattr(config, "family", None)
    if family not in tables:
        raise ShardingError(f"no logical axes for model family {family!r}")
    return tables[family]


def logical_axes(path: str, ndim: int, table: dict) -> tuple:
    """The logical axes of parameter `path`: an exact entry, else the entry for its path with leading components
    (such as a reward model's ``backbone.``) removed, else replicated."""
    parts = path.split(".")
    for i in range(len(parts)):
        hit = table.get(".".join(parts[i:]))
        if hit is not None:
            return hit
    return (None,) * ndim


def check_heads(config, mesh: Mesh, rules: Rules = DEFAULT_RULES, what: str = "model"):
    """Attention heads and KV heads must split evenly over the axis that shards them."""
    for logical, count in (("heads", config.num_heads), ("kv_heads", config.num_kv_heads)):
        size = _axis_size(mesh, tuple(a for a in _names(rules.mesh_axes(logical))))
        if size > 1 and count % size:
            raise ShardingError(f"cannot shard the {what}'s {logical} ({count}) over mesh axis "
                                f"{_axes_name(_names(rules.mesh_axes(logical)))} of size {size}; use a mesh whose "
                                f"tensor size divides {count}, or Rules(heads=None, kv_heads=None)")


def _names(axes) -> tuple:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def param_shardings(config, shapes: dict, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """{path: NamedSharding} for the flat parameter shapes {path: shape} of a model with `config`."""
    check_heads(config, mesh, rules)
    table = logical_axes_table(config)
    return {k: NamedSharding(mesh, spec_for(k, s, logical_axes(k, len(s), table), mesh, rules))
            for k, s in shapes.items()}


def place(host: np.ndarray, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A global array from a host array that every process holds (or can read): each process copies only the slices
    its own devices hold (`jax.make_array_from_callback`); no device ever holds the whole array first unless the
    sharding replicates it."""
    host = np.asarray(host)

    def shard(index):
        piece = host[index]
        return piece.astype(dtype) if dtype is not None else piece

    return jax.make_array_from_callback(host.shape, sharding, shard)


def shard_params(config, flat: dict, mesh: Mesh, rules: Rules = DEFAULT_RULES, dtype=None) -> dict:
    """Place a flat {path: host array} parameter dict on the mesh by its logical axes."""
    shardings = param_shardings(config, {k: np.shape(v) for k, v in flat.items()}, mesh, rules)
    return {k: place(v, shardings[k], dtype) for k, v in flat.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh, batch: int, ndim: int, rules: Rules = DEFAULT_RULES, what: str = "batch") -> PartitionSpec:
    """Rows over the batch axes; ShardingError when they do not divide the row count."""
    return spec_for(what, (batch,) + (1,) * (ndim - 1), ("batch",) + (None,) * (ndim - 1), mesh, rules)


def batch_sharding(mesh: Mesh, batch: int, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, batch, ndim, rules))


def check_batch(mesh, rows: int, rules: Rules = DEFAULT_RULES, what: str = "the batch"):
    """ShardingError, naming the mesh axes, when the batch axes do not divide `rows` (no-op without a mesh)."""
    if mesh is not None:
        batch_spec(mesh, rows, 1, rules, what=what)


def cache_spec(mesh, shape, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """A KV cache [L, B, S, KVH, D]: rows over the batch axes, KV heads over tensor when it divides them (a draft
    with fewer KV heads than the tensor axis keeps them whole). A cache whose B the batch axes do not divide (the
    prefill of 2 prompts before Best-of-N fans them out to 2 x n rows) is left to the compiler; the user-facing row
    counts are checked where they enter (`check_batch`)."""
    try:
        b_spec = batch_spec(mesh, shape[1], 1, rules)[0]
    except ShardingError:
        b_spec = None
    kv = tuple(a for a in _names(rules.mesh_axes("kv_heads")) if mesh.shape.get(a, 1) > 1 and a not in _names(b_spec))
    kv_size = _axis_size(mesh, kv) if kv else 1
    kv_axes = (kv[0] if len(kv) == 1 else kv) if kv and shape[3] % kv_size == 0 else None
    return PartitionSpec(None, b_spec, None, kv_axes, None)


def constrain_cache(k: jax.Array, v: jax.Array, rules: Rules = DEFAULT_RULES):
    """Inside a jitted function traced under a mesh (`jax.set_mesh`): pin a fresh KV cache to its layout."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return k, v
    spec = cache_spec(mesh, k.shape, rules)
    return jax.lax.with_sharding_constraint(k, spec), jax.lax.with_sharding_constraint(v, spec)


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first leaf of `tree` placed with a NamedSharding on a multi-device mesh, else None."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def to_global(tree, mesh: Mesh):
    """Multi-process: every host value (NumPy, Python scalars, single-device arrays) of `tree` becomes an array
    replicated over `mesh`; arrays already on the mesh are kept. Typed PRNG keys stay typed."""
    def one(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(np.asarray(jax.random.key_data(x)), replicated(mesh))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, (np.ndarray, jax.Array, np.generic, int, float, bool)):
            return place(np.asarray(x), replicated(mesh))
        return x
    return jax.tree.map(one, tree)


def to_host(tree):
    """Every array of `tree` as NumPy on every process: fully addressable arrays are copied, global arrays are
    gathered (`process_allgather`)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x if x.is_fully_addressable else jax.random.wrap_key_data(to_host(jax.random.key_data(x)))
        if x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def is_main_process() -> bool:
    """True on the process that writes outputs, metrics and logs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str):
    """All processes wait here (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, **kwargs):
    """Start a multi-process run: call it on every process before anything else touches JAX.

    On Cloud TPU pods, SLURM and other clusters that JAX detects, call it without arguments. Elsewhere give the
    coordinator (``host:port`` of process 0), the process count and this process's id, or set the environment
    variables RSS_JAX_COORDINATOR, RSS_JAX_NUM_PROCESSES and RSS_JAX_PROCESS_ID. With an explicit coordinator the
    cluster auto-detection is switched off (so that a SLURM allocation does not override what you passed)."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("RSS_JAX_COORDINATOR")
    if num_processes is None and env.get("RSS_JAX_NUM_PROCESSES"):
        num_processes = int(env["RSS_JAX_NUM_PROCESSES"])
    if process_id is None and env.get("RSS_JAX_PROCESS_ID"):
        process_id = int(env["RSS_JAX_PROCESS_ID"])
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ShardingError("an explicit coordinator needs num_processes and process_id as well (or "
                                "RSS_JAX_NUM_PROCESSES and RSS_JAX_PROCESS_ID)")
        kwargs.setdefault("cluster_detection_method", "deactivate")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids, **kwargs)


initialize_distributed = initialize  # the earlier name
