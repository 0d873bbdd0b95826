"""int8 weight-only quantisation (`rj.load(..., quantize="int8")`, rss_jax.kernels).

Oracles: NumPy for the product and for the group quantiser; transformers on PyTorch, run on a copy of the checkpoint
whose weights were quantised and widened back by the NumPy quantiser, for every family's logits and greedy tokens.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax import kernels


def np_quantize(w, group=32):
    """The group quantiser in NumPy: w [..., N, K] -> (q int8, scale [..., N, G]); G = K // group, or 1."""
    w = np.asarray(w, np.float32)
    k = w.shape[-1]
    g = group if k % group == 0 else k
    blocks = w.reshape(*w.shape[:-1], k // g, g)
    amax = np.abs(blocks).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(blocks / scale), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale[..., 0]


def np_dequantize(q, scale):
    g = q.shape[-1] // scale.shape[-1]
    return (q.astype(np.float32).reshape(*q.shape[:-1], scale.shape[-1], g) * scale[..., None]).reshape(q.shape)


@pytest.mark.parametrize("k,group", [(64, 32), (48, 32), (96, 0)])
def test_quantize_rows_matches_numpy_and_bounds_the_error(k, group):
    w = np.random.default_rng(k).standard_normal((3, 10, k)).astype(np.float32)
    w[0, 0] = 0.0  # an all-zero channel keeps scale 1 and q 0
    q, s = kernels.quantize_rows(w, group) if group else kernels.quantize_rows(w, 0)
    nq, ns = np_quantize(w, group or 10 ** 9)
    np.testing.assert_array_equal(np.asarray(q), nq)
    np.testing.assert_allclose(np.asarray(s), ns, rtol=1e-6)
    back = np.asarray(kernels.dequantize_rows(q, s))
    # round to nearest: every weight within half a step of its group's scale
    step = np.repeat(ns, k // ns.shape[-1], axis=-1)
    assert (np.abs(back - w) <= 0.5 * step + 1e-7).all()
    assert (np.asarray(q)[0, 0] == 0).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64, 70])
@pytest.mark.parametrize("k,n,group", [(64, 48, 32), (96, 33, 32), (40, 17, 0)])
def test_int8_matmul_matches_numpy(rows, k, n, group):
    """The CPU kernel (rows <= KERNEL_MAX_ROWS) and the XLA path (more rows) against x @ dequantize(w).T."""
    rng = np.random.default_rng(rows * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = np_quantize(w, group or 10 ** 9)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = x @ np_dequantize(q, s).T
    got = np.asarray(jax.jit(kernels.int8_matmul)(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # leading axes fold into rows; a bfloat16 x comes back as bfloat16
    x3 = jnp.asarray(x.reshape(1, rows, k), jnp.bfloat16)
    y3 = kernels.int8_matmul(x3, jnp.asarray(q), jnp.asarray(s))
    assert y3.shape == (1, rows, n) and y3.dtype == jnp.bfloat16
    ref16 = np.asarray(x3, np.float32)[0] @ np_dequantize(q, s).T
    np.testing.assert_allclose(np.asarray(y3, np.float32)[0], ref16, atol=0.1, rtol=0.02)


def test_int8_matmul_refuses_bad_shapes():
    q = jnp.zeros((8, 64), jnp.int8)
    with pytest.raises(ValueError, match="scale \\[\\(L,\\) N, G\\] with G dividing K"):
        kernels.int8_matmul(jnp.zeros((1, 64)), q, jnp.ones((8, 3)))
    with pytest.raises(ValueError, match="int8"):
        kernels.int8_matmul(jnp.zeros((1, 64)), q.astype(jnp.float32), jnp.ones((8, 2)))


def test_the_kernel_is_built_on_this_machine():
    """CI's machine has a compiler: the product goes through the kernel there, not silently through XLA."""
    import os
    import shutil
    if jax.default_backend() != "cpu" or os.environ.get(kernels.KERNEL_ENV, "auto").lower() in ("off", "0"):
        pytest.skip("the kernel serves the CPU backend, and is switched off here")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++", os.environ.get("CXX") or "")):
        pytest.skip("no C++ compiler on this machine")
    assert kernels.kernel_available()


def torch_oracle(model, family):
    """A copy of the transformers model with every matrix rss_jax quantises replaced by its NumPy round trip."""
    import torch
    m = copy.deepcopy(model)
    skip = ("wpe", "embed_positions", "project_in", "project_out")
    with torch.no_grad():
        for name, p in m.named_parameters():  # shared (tied) tensors come once
            if p.ndim != 2 or any(s in name for s in skip):
                continue
            w = p.detach().numpy()
            conv1d = family == "gpt2" and "wte" not in name  # GPT-2's Conv1D stores [in, out]
            rows = w.T if conv1d else w
            back = np_dequantize(*np_quantize(rows))
            p.copy_(torch.from_numpy(np.ascontiguousarray(back.T if conv1d else back)))
    return m


FAMILIES = ["llama_gqa_llama3rope", "qwen2_bias", "mistral_head_dim", "gpt2", "opt350m_style"]


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_model_equals_transformers_on_the_quantised_weights(tiny_checkpoints, name):
    """Every family: logits of a short batch (kernel path) and of a long one (XLA path), and 12 greedy tokens of
    the cached decode loop, equal transformers run on the same quantised-then-widened weights."""
    import torch
    path, model = tiny_checkpoints[name]
    family = "gpt2" if name == "gpt2" else name
    oracle = torch_oracle(model, family)
    lm = rj.load(path, quantize="int8")
    assert lm.quantize == "int8" and "int8" in repr(lm)
    rng = np.random.default_rng(1)
    for shape in ((2, 9), (2, 40)):  # 18 rows: the kernel; 80 rows: XLA's product
        tokens = rng.integers(3, 90, shape)
        ours = np.asarray(lm.logits(tokens))
        with torch.no_grad():
            ref = oracle(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3, err_msg=f"{name} {shape}")
    prompt = [5, 17, 33, 2, 60]
    out = rj.generate(lm, [prompt], max_new_tokens=12, temperature=0.0, eos=[])
    with torch.no_grad():
        ref = oracle.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert out.tokens[0].tolist() == ref


def test_int8_target_and_head_speculate_exactly(tiny_checkpoints):
    """SD with an int8 target and an int8 feature-draft head: greedy SD reproduces the int8 target's greedy tokens
    (the verification is exact whatever the draft proposes), and the int8 head's forward equals the float head run
    on its quantised-then-widened weights."""
    path, _ = tiny_checkpoints["llama_mqa_tied"]
    target = rj.load(path, quantize="int8")
    head = rj.heads.new_head(rj.load(path), seed=3, depth=2)
    qhead = head.quantized("int8")
    assert qhead.quantize == "int8"
    prompts = [[4, 9, 12, 40], [7, 7, 30]]
    ar = rj.generate(target, prompts, max_new_tokens=10, temperature=0.0, eos=[])
    sd = rj.generate(target, prompts, method="sd", draft=qhead, k=3, max_new_tokens=10, temperature=0.0, eos=[])
    np.testing.assert_array_equal(np.asarray(sd.tokens), np.asarray(ar.tokens))
    # the quantised head against the float head holding the widened weights
    from flax import nnx
    float_mod = nnx.merge(head.graphdef, head.state)
    from rss_jax.models.feature_head import LAYER_MATRICES
    owned = [(float_mod, name) for name in float_mod.QUANT_PARAMS] + [(float_mod.block1, n) for n in LAYER_MATRICES]
    for owner, name in owned:
        p = getattr(owner, name, None)
        if p is not None:
            p.value = jnp.asarray(np_dequantize(*np_quantize(np.asarray(p.value).T)).T)
    q_mod = nnx.merge(qhead.graphdef, qhead.state)
    assert all(getattr(q_mod.layer(i), n).value.dtype == jnp.int8 for i in (0, 1) for n in LAYER_MATRICES)
    rng = np.random.default_rng(0)
    e = head.config.hidden_size
    feat = jnp.asarray(rng.standard_normal((1, 5, len(head.config.taps), e)).astype(np.float32))
    toks = jnp.asarray(rng.integers(3, 90, (1, 5)))
    table = target.module.token_embeddings()
    rows = target.module.output_matrix()[jnp.asarray(head.config.token_ids)]
    a = float_mod(float_mod.fuse(feat), toks, table, rows)[0]
    b = q_mod(q_mod.fuse(feat), toks, table, rows)[0]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-3)


def test_quantize_errors(tiny_checkpoints, tmp_path):
    path, _ = tiny_checkpoints["llama_mqa_tied"]
    with pytest.raises(ValueError, match="quantize must be 'int8' or None"):
        rj.load(path, quantize="int4")
    with pytest.raises(ValueError, match="one device"):
        rj.load(path, quantize="int8", mesh=rj.sharding.make_mesh())
    lm = rj.load(path, quantize="int8")
    with pytest.raises(ValueError, match="saves only in float"):
        lm.save(str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()
    head = rj.heads.new_head(rj.load(path)).quantized()
    with pytest.raises(ValueError, match="saves only in float"):
        head.save(str(tmp_path / "h"))
    assert not (tmp_path / "h").exists()


def test_worked_example_of_the_docs():
    """docs/algorithms.md §11: the group [0.5, -1.27, 0.02, 0, ...] and x = [1, 1, 1, 0, ...]."""
    w = np.zeros((1, 32), np.float32)
    w[0, :3] = [0.5, -1.27, 0.02]
    q, s = kernels.quantize_rows(w)
    assert np.asarray(q)[0, :4].tolist() == [50, -127, 2, 0]
    np.testing.assert_allclose(np.asarray(s), [[0.01]], rtol=1e-6)
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = 1
    np.testing.assert_allclose(np.asarray(kernels.int8_matmul(jnp.asarray(x), q, s)), [[-0.75]], rtol=1e-5)


def test_bfloat16_int8_model_decodes_and_training_refuses_it(tiny_checkpoints):
    """dtype bfloat16 with int8 weights: logits near the float32 int8 model's, the cached decode runs; training
    entry points refuse a quantised model with a fix."""
    from training import make_draft
    path, _ = tiny_checkpoints["qwen2_bias"]
    q32 = rj.load(path, quantize="int8")
    q16 = rj.load(path, dtype="bfloat16", quantize="int8")
    tokens = np.random.default_rng(2).integers(3, 90, (1, 12))
    a, b = np.asarray(q32.logits(tokens)), np.asarray(q16.logits(tokens))
    assert np.abs(a - b).max() < 0.15 * np.abs(a).max()
    out = rj.generate(q16, [[4, 5, 6]], max_new_tokens=6, temperature=0.0, eos=[])
    assert out.tokens.shape == (1, 6)
    with pytest.raises(ValueError, match="load it without quantize="):
        make_draft(q32, [0])
