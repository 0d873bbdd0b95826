"""Logical axes and sharding rules, in this process (abstract meshes: no devices needed): every parameter of every
family is declared, the rules give the expected PartitionSpecs, and a mesh axis that does not divide a weight, the
heads or the batch is an error that names it."""
from __future__ import annotations

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from rss_jax import sharding
from rss_jax.loading import flatten_targets
from rss_jax.models.config import read_hf_config


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


@pytest.fixture(scope="module")
def configs(tiny_checkpoints):
    return {name: read_hf_config(path)[0] for name, (path, _) in tiny_checkpoints.items()}


def test_every_parameter_has_logical_axes(configs):
    for name, cfg in configs.items():
        table = sharding.logical_axes_table(cfg)
        for path, target in flatten_targets(cfg).items():
            shape = target.shape
            assert path in table, f"{name}: parameter {path} has no logical axes in its family's LOGICAL_AXES"
            assert len(table[path]) == len(shape), (name, path, table[path], shape)


def test_rules_map_logical_axes_to_mesh_axes(configs):
    cfg = configs["qwen2_bias"]
    shapes = {k: v.shape for k, v in flatten_targets(cfg).items()}
    m = mesh(data=2, fsdp=2, tensor=2)
    specs = {k: sharding.spec_for(k, s, sharding.logical_axes(k, len(s), sharding.logical_axes_table(cfg)), m)
             for k, s in shapes.items()}
    assert specs["layers.wq"] == P(None, "fsdp", "tensor")
    assert specs["layers.wo"] == P(None, "tensor", "fsdp")
    assert specs["layers.w_down"] == P(None, "tensor", "fsdp")
    assert specs["embed_tokens"] == P("tensor", "fsdp")
    assert specs["layers.attn_norm"] == P(None, None)
    # replicating a logical axis by rule
    rules = sharding.Rules(vocab=None)
    assert sharding.spec_for("embed_tokens", shapes["embed_tokens"], ("vocab", "embed"), m, rules) == P(None, "fsdp")
    # the batch lives over data x fsdp; size-1 axes drop out
    assert sharding.batch_spec(m, 8, 2) == P(("data", "fsdp"), None)
    assert sharding.batch_spec(mesh(data=4), 8, 1) == P("data")
    # a KV cache [L, B, S, KVH, D]: rows over the batch axes, KV heads over tensor when it divides them
    assert sharding.cache_spec(m, (2, 8, 16, 2, 8)) == P(None, ("data", "fsdp"), None, "tensor", None)
    assert sharding.cache_spec(m, (2, 8, 16, 1, 8)) == P(None, ("data", "fsdp"), None, None, None)


def test_indivisible_weight_names_parameter_dimension_and_axis(configs):
    cfg = configs["qwen2_bias"]  # hidden 32
    shapes = {k: v.shape for k, v in flatten_targets(cfg).items()}
    with pytest.raises(sharding.ShardingError) as e:
        sharding.spec_for("layers.wq", shapes["layers.wq"], ("layers", "embed", "heads"), mesh(fsdp=3))
    msg = str(e.value)
    assert "layers.wq" in msg and "dimension 1" in msg and "embed" in msg and "fsdp" in msg and "3" in msg


def test_indivisible_heads_and_batch_are_errors(configs):
    cfg = configs["qwen2_bias"]  # 4 heads, 2 KV heads
    with pytest.raises(sharding.ShardingError, match=r"kv_heads \(2\).*tensor.*4"):
        sharding.check_heads(cfg, mesh(tensor=4))
    with pytest.raises(sharding.ShardingError, match=r"heads \(4\).*tensor.*3"):
        sharding.check_heads(cfg, mesh(tensor=3))
    sharding.check_heads(cfg, mesh(tensor=2))
    with pytest.raises(sharding.ShardingError, match=r"6 prompts.*data of size 4"):
        sharding.check_batch(mesh(data=4), 6, what="the batch of 6 prompts")
    with pytest.raises(sharding.ShardingError, match=r"data x fsdp of size 4"):
        sharding.check_batch(mesh(data=2, fsdp=2), 6)
    sharding.check_batch(None, 7)


def test_mesh_construction_errors():
    import jax
    n = len(jax.devices())
    with pytest.raises(sharding.ShardingError, match="does not match"):
        sharding.make_mesh(data=n + 1)
    with pytest.raises(sharding.ShardingError, match="cannot be split"):
        sharding.make_mesh(tensor=n + 1)
    with pytest.raises(sharding.ShardingError, match="bad mesh item"):
        sharding.parse_mesh("data=2,model=4")
    m = sharding.parse_mesh("data=-1")
    assert dict(m.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
