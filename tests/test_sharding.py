"""The same code on a simulated 8-device mesh (data x fsdp x tensor): sharded weights give the same logits, the same
tokens (AR, SD, SSS and EFT with separate drafts and with feature-draft heads, Speculative Rejection, GSI, RSD,
ARGS, CARDS, RS, TreeBoN) and the same SFT / distillation / DPO steps as one device. Runs in a subprocess because the device count is fixed at JAX start-up."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    import rss_jax as rj
    from rss_jax.sharding import make_mesh
    assert len(jax.devices()) == 8, jax.devices()
    path = sys.argv[1]
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    plain, sharded = rj.load(path), rj.load(path, mesh=mesh)
    wq = sharded.params()["layers.wq"]
    assert len(wq.sharding.device_set) == 8, wq.sharding
    tokens = np.random.default_rng(0).integers(2, 90, (4, 9))
    np.testing.assert_allclose(np.asarray(sharded.logits(tokens)), np.asarray(plain.logits(tokens)), atol=1e-4)
    a = rj.generate(plain, tokens.tolist(), max_new_tokens=6, temperature=0.0, eos=[])
    b = rj.generate(sharded, tokens.tolist(), max_new_tokens=6, temperature=0.0, eos=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    s = rj.generate(sharded, tokens.tolist(), method="sd", draft=sharded, k=2, max_new_tokens=6, temperature=0.0,
                    eos=[])
    np.testing.assert_array_equal(s.tokens, a.tokens)

    # the KV cache a compiled loop creates lives with rows over data x fsdp and KV heads over tensor
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from rss_jax.decoding.autoregressive import prefill
    toks, lens = rj.decoding.common.pad_prompts(tokens.tolist(), 16)
    with jax.set_mesh(mesh):
        cache = jax.jit(lambda st, t, n: prefill(nnx.merge(sharded.graphdef, st), t, n, 24)[1])(sharded.state, toks,
                                                                                                 lens)
    want = jax.sharding.NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
    assert cache.k.sharding.is_equivalent_to(want, 5), cache.k.sharding
    assert {s.data.shape for s in cache.k.addressable_shards} == {(2, 1, 24, 1, 8)}, cache.k.addressable_shards[0]

    # SSS (separate drafts), EFT and SSS with feature-draft heads, sampled: the same tokens on the mesh
    d_path, s_path, pairs, sft_data, work = sys.argv[2:7]
    d_plain, s_plain = rj.load(d_path), rj.load(s_path)
    d_mesh, s_mesh = rj.load(d_path, mesh=mesh), rj.load(s_path, mesh=mesh)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=11, eos=[])
    for method in ("sss", "eft"):
        a = rj.generate(plain, tokens.tolist(), method=method, draft=d_plain, sft=s_plain, k=3, **kw)
        b = rj.generate(sharded, tokens.tolist(), method=method, draft=d_mesh, sft=s_mesh, k=3, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
    h_al, h_sft = rj.heads.new_head(plain, seed=1), rj.heads.new_head(plain, seed=2)
    for method in ("sss", "eft"):
        a = rj.generate(plain, tokens.tolist(), method=method, draft=h_al, sft=h_sft, k=2, **kw)
        b = rj.generate(sharded, tokens.tolist(), method=method, draft=h_al.replicate(mesh),
                        sft=h_sft.replicate(mesh), k=2, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
    # Speculative Rejection: 4 prompts x 4 rows, pruned to 2 then 1 (row counts the mesh does not divide)
    reward = rj.rewards.CallableReward(lambda p, rs: [float(sum(r) % 11) for r in rs])
    a = rj.speculative_rejection(plain, tokens.tolist(), reward, alpha=0.5, n_init=4, stops=[2, 4],
                                 max_new_tokens=6, seed=4, eos=[])
    b = rj.speculative_rejection(sharded, tokens.tolist(), reward, alpha=0.5, n_init=4, stops=[2, 4],
                                 max_new_tokens=6, seed=4, eos=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # the step-level and segment-level searches and TreeBoN (feature-draft heads as its DPO / SFT pair)
    plain_small = rj.load(d_path)
    runs = {"gsi": lambda lm, small, h: rj.gsi(small, lm, tokens.tolist(), reward, n=4, **kw2),
            "rsd": lambda lm, small, h: rj.rsd(small, lm, tokens.tolist(), reward, **kw2),
            "args": lambda lm, small, h: rj.args(lm, tokens.tolist(), reward, k=4, **kw2),
            "cards": lambda lm, small, h: rj.cards(lm, tokens.tolist(), reward, tau_r=5.0, **kw2),
            "rs": lambda lm, small, h: rj.rejection_sampling(lm, tokens.tolist(), reward, tau_r=5.0, **kw2),
            "treebon": lambda lm, small, h: rj.treebon(lm, tokens.tolist(), reward, n=4, n_children=2, n_layers=2,
                                                       dpo=h[0], sft=h[1], **kw2)}
    kw2 = dict(max_new_tokens=6, seed=1, eos=[])
    for name, run in runs.items():
        a = run(plain, plain_small, (h_al, h_sft))
        b = run(sharded, d_mesh, (h_al.replicate(mesh), h_sft.replicate(mesh)))
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=name)
    # a batch the mesh's data x fsdp (4) does not divide is refused by name
    try:
        rj.generate(sharded, tokens[:3].tolist(), max_new_tokens=2, temperature=0.0)
        raise AssertionError("a batch of 3 on data x fsdp = 4 was accepted")
    except rj.sharding.ShardingError as e:
        assert "data x fsdp" in str(e) and "3 prompts" in str(e), e
    # the trainer: SFT, distillation and DPO steps on the mesh equal one device
    import training
    from training import TrainConfig
    for mode, data, extra in (("sft", sft_data, {}), ("distill", sft_data, {"teacher": d_path}),
                              ("dpo", pairs, {})):
        losses = []
        for m in (None, mesh):
            res = training.train(TrainConfig(mode=mode, policy=path, data=data, steps=2, batch_size=4,
                                             learning_rate=1e-2, output=f"{work}/{mode}-{m is not None}",
                                             mesh=m, progress=False, export=False, **extra))
            losses.append(([r["loss"] for r in res.metrics], res.lm.params()["layers.wq"]))
        np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=2e-5)
        np.testing.assert_allclose(np.asarray(losses[0][1]), np.asarray(losses[1][1]), rtol=1e-4, atol=1e-6)
        assert len(res.lm.params()["layers.wq"].sharding.device_set) == 8
    print("SHARDED-OK")
""")


def test_eight_device_mesh_matches_one_device(tiny_checkpoints, tmp_path):
    from tests.test_training import pair_records, write_jsonl
    script = tmp_path / "mesh.py"
    script.write_text(SCRIPT)
    rng = np.random.default_rng(3)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(n=8))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt_ids": rng.integers(1, 90, 4).tolist(),
                                                "response_ids": rng.integers(1, 90, 6).tolist()} for _ in range(8)])
    extra = [tiny_checkpoints["llama_gqa_llama3rope"][0], tiny_checkpoints["llama_mha_linear"][0], str(pairs),
             str(sft), str(tmp_path)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script), tiny_checkpoints["qwen2_bias"][0], *extra], env=env,
                         capture_output=True, text=True, timeout=600)
    assert "SHARDED-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
