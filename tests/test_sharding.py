"""The same code on a simulated 8-device mesh (data x fsdp x tensor): sharded weights give the same logits and the
same generated tokens as one device. Runs in a subprocess because the device count is fixed at JAX start-up."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
    print("SHARDED-OK")
""")


def test_eight_device_mesh_matches_one_device(tiny_checkpoints, tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script), tiny_checkpoints["qwen2_bias"][0]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert "SHARDED-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
