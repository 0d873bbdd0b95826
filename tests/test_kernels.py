"""The CPU decode kernels (rss_jax/kernels/matmul.cc) against NumPy, and the decode loop that hands them each layer
of the stacked weights in place (`kernels.LayerWeight`), with its KV writes deferred to after the last layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax import kernels
from rss_jax.cache import init_cache
from rss_jax.models import base, layers

needs_kernel = pytest.mark.skipif(not kernels.kernel_available(), reason="no CPU kernel on this backend")


def _ref(x, w):
    return np.asarray(x, np.float64) @ np.asarray(jnp.asarray(w, jnp.float32), np.float64)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matmul_reads_one_layer_of_a_stack(dtype):
    """Every layer of a stack [L, K, N], at row counts the kernel takes (1-64: its eight-, four-, three-, two- and
    one-row passes and their mixtures, e.g. 15 = 8 + 4 + 3) and one above (XLA's path), with N leaving a partial
    panel and a tail of single columns, and K not a multiple of anything. bfloat16 weights are compared with
    float64 products of the same rounded weights."""
    rng = np.random.default_rng(0)
    L, K, N = 3, 37, 300
    w = jnp.asarray(rng.normal(size=(L, K, N)), jnp.float32).astype(dtype)
    f = jax.jit(kernels.dense_matmul, static_argnums=2)
    for rows in (1, 2, 3, 5, 7, 8, 15, 64, 65):
        x = jnp.asarray(rng.normal(size=(rows, K)), jnp.float32)
        for layer in range(L):
            want = _ref(x, w[layer])
            got = np.asarray(f(x, w, layer))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(),
                                       err_msg=f"rows {rows} layer {layer}")
    # a plain [K, N] matrix, leading dimensions on x, and the output dtype follows x
    x = jnp.asarray(rng.normal(size=(2, 3, K)), jnp.float32).astype(dtype)
    got = kernels.dense_matmul(x, w[1])
    assert got.shape == (2, 3, N) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), _ref(x.reshape(6, K), w[1]).reshape(2, 3, N),
                               rtol=2e-2, atol=2e-2 * 8)


@needs_kernel
@pytest.mark.parametrize("n, k, group", [(42, 64, 32), (41, 64, 64), (8, 40, 40)])
def test_int8_matmul_reads_one_layer_of_a_stack(n, k, group):
    """Stacked int8 rows [L, N, K] with float32 and with bfloat16 scales (those are widened one layer at a time), at
    row counts of every path (one row; the register-blocked rows, four at a time with a remainder; more than one
    group of eight), N leaving channels outside the blocks of four, groups of 32, one scale per row (K a multiple
    of 16, the blocked path) and K = 40 with one scale per row (the plain path)."""
    rng = np.random.default_rng(1)
    q, s = kernels.quantize_rows(rng.normal(size=(3, n, k)).astype(np.float32), group=group)
    for rows in (1, 2, 3, 4, 5, 9):
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
        for scale in (s, s.astype(jnp.bfloat16)):
            for layer in range(3):
                w = np.asarray(kernels.dequantize_rows(q[layer], scale[layer]), np.float64)
                got = np.asarray(kernels.int8_matmul(x, q, scale, layer=layer))
                np.testing.assert_allclose(got, np.asarray(x, np.float64) @ w.T, rtol=1e-5, atol=1e-4,
                                           err_msg=f"rows {rows} layer {layer}")


def test_kernel_inputs_are_checked():
    with pytest.raises(ValueError, match="float32 or bfloat16 weights"):
        kernels.dense_matmul(jnp.zeros((1, 4)), jnp.zeros((4, 3), jnp.float16))
    with pytest.raises(ValueError, match=r"x \[..., K\]"):
        kernels.dense_matmul(jnp.zeros((1, 5)), jnp.zeros((2, 4, 3)), 1)


def test_attention_of_new_tokens_over_the_unwritten_cache_equals_numpy():
    """The unrolled loop's attention reads a layer's slots before this forward writes them and attends to the new
    tokens from k and v themselves. Both ways (XLA's `layers.split_attention` on one layer's slots, and
    `kernels.cached_attention` on a stacked cache, read in place: the CPU kernel where it is built) against NumPy
    attention over the cache with the new tokens written in: ragged lengths, garbage in every slot at or past a row's
    length (it must not count), T = 1 and blocks of T = 4, a head size that is not a multiple of the vector width,
    float32 and bfloat16 caches, one query head per KV head and three."""
    rng = np.random.default_rng(2)
    B, S, L = 3, 12, 3
    cases = [(1, [0, 5, 11], 2, 3, 16, np.float32), (4, [0, 2, 8], 2, 3, 8, np.float32),
             (1, [7, 0, 12], 3, 1, 64, jnp.bfloat16), (4, [3, 8, 1], 1, 4, 20, jnp.bfloat16)]
    for t, lengths, KVH, G, D, cdt in cases:
        stack_k = (rng.normal(size=(L, B, S, KVH, D)) * 3).astype(cdt)
        stack_v = (rng.normal(size=(L, B, S, KVH, D)) * 3).astype(cdt)
        k = rng.normal(size=(B, t, KVH, D)).astype(np.float32)
        v = rng.normal(size=(B, t, KVH, D)).astype(np.float32)
        q = rng.normal(size=(B, t, KVH, G, D)).astype(np.float32)
        layer = 1
        old_k, old_v = (np.asarray(a[layer], np.float32) for a in (stack_k, stack_v))
        ways = {"xla": layers.split_attention(jnp.asarray(q), jnp.asarray(stack_k[layer]),
                                              jnp.asarray(stack_v[layer]), jnp.asarray(k), jnp.asarray(v),
                                              jnp.asarray(lengths)),
                "stacked": jax.jit(kernels.cached_attention, static_argnums=3)(
                    jnp.asarray(q), jnp.asarray(stack_k), jnp.asarray(stack_v), layer, jnp.asarray(k),
                    jnp.asarray(v), jnp.asarray(lengths, jnp.int32))}
        for name, got in ways.items():
            got = np.asarray(got)
            for b in range(B):
                n = lengths[b]
                keys = np.concatenate([old_k[b, :n], k[b]])  # [n + t, KVH, D]
                vals = np.concatenate([old_v[b, :n], v[b]])
                for i in range(t):
                    sc = np.einsum("kgd,skd->kgs", q[b, i], keys[:n + i + 1]) / np.sqrt(D)
                    p = np.exp(sc - sc.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    want = np.einsum("kgs,skd->kgd", p, vals[:n + i + 1])
                    np.testing.assert_allclose(got[b, i], want, rtol=1e-4, atol=1e-4,
                                               err_msg=f"{name}: t {t} D {D} {np.dtype(cdt)} row {b} token {i}")


@needs_kernel
def test_decode_model_hands_the_kernels_each_layer_in_place(tiny_checkpoints, monkeypatch):
    """On the CPU the unrolled loop gets `LayerWeight`s for every matrix (no per-layer copies) and slices only the
    small vectors. bfloat16 models take it too (their products in the kernel): their cached logits stay within
    bfloat16 rounding of the float32 model's, and no further from them than the scanned loop's (XLA's bfloat16
    products)."""
    path, _ = tiny_checkpoints["llama_gqa_llama3rope"]
    lm = rj.load(path, dtype="bfloat16")

    def layer_list(state):
        model = base.decode_model(lm.graphdef, state)
        return model.__dict__.get("_layer_list")

    seen = {}

    @jax.jit
    def probe(state):
        per_layer = layer_list(state)
        seen["kinds"] = {k: type(v).__name__ for k, v in per_layer[0].items()}
        return per_layer[0]["attn_norm"]
    probe(lm.state)
    assert {k for k, v in seen["kinds"].items() if v == "LayerWeight"} == set(lm.module.QUANT_LAYER_PARAMS)
    assert seen["kinds"]["attn_norm"] != "LayerWeight"

    tokens = jnp.asarray([[5, 9, 11, 3, 7, 2, 8, 8]])

    def logits_of(lm_, mode):
        monkeypatch.setenv(base.LAYER_LOOP_ENV, mode)

        @jax.jit
        def run(state):  # a prefill of 5 tokens, then 3 single cached steps
            model = base.decode_model(lm_.graphdef, state)
            cache = init_cache(lm_.config, 1, 16, dtype=base.compute_dtype(state))
            first, cache = model(tokens[:, :5], cache=cache, lengths=jnp.zeros((1,), jnp.int32))
            outs = [first[0]]
            for i in range(5, 8):
                step, cache = model(tokens[:, i:i + 1], cache=cache, lengths=jnp.full((1,), i, jnp.int32))
                outs.append(step[0])
            return jnp.concatenate(outs)
        return np.asarray(run(lm_.state), np.float32)

    want = logits_of(rj.load(path), "scan")  # float32
    err = {mode: np.abs(logits_of(lm, mode) - want).max() for mode in ("unroll", "scan")}
    assert err["unroll"] < 0.05 * np.abs(want).max(), err
    assert err["unroll"] <= 2 * err["scan"] + 1e-3, err  # the kernel's float32 sums are no worse than XLA's bf16


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_rows_matmul_equals_numpy(dtype):
    """Output-major weights [N, K] (a tied head's token table): row counts on both sides of the kernel's range, N
    not a multiple of the four rows read together, K not a multiple of the vector width."""
    rng = np.random.default_rng(2)
    n, k = 303, 45
    w = jnp.asarray(rng.normal(size=(n, k)), jnp.float32).astype(dtype)
    f = jax.jit(kernels.dense_rows_matmul)
    for rows in (1, 2, 3, 4, 5, 7, 8, 65):
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
        want = _ref(x, jnp.asarray(w, jnp.float32).T)
        got = np.asarray(f(x, w))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(), err_msg=f"rows {rows}")
    with pytest.raises(ValueError, match=r"weights \[N, K\]"):
        kernels.dense_rows_matmul(jnp.zeros((1, 4)), jnp.zeros((3, 5)))


@pytest.mark.parametrize("kvh", [1, 3, 6])
def test_few_token_attention_equals_numpy_for_any_kv_head_count(kvh):
    """The block-product layout (up to BLOCK_PRODUCT_MAX_KV_HEADS KV heads) and the broadcast one above it give
    softmax attention over the visible slots, against a NumPy loop over heads."""
    rng = np.random.default_rng(3)
    b, t, g, d, s = 2, 3, 2, 8, 11
    qg = rng.normal(size=(b, t, kvh, g, d)).astype(np.float32)
    keys = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    values = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    lengths = np.array([2, 6])
    mask = np.arange(s)[None, None, :] <= (lengths[:, None] + np.arange(t)[None, :])[:, :, None]
    got = np.asarray(layers._fused_short_attention(jnp.asarray(qg), jnp.asarray(keys), jnp.asarray(values),
                                                   jnp.asarray(mask)))
    want = np.zeros_like(got)
    for bi in range(b):
        for ti in range(t):
            vis = mask[bi, ti]
            for h in range(kvh):
                for gi in range(g):
                    sc = keys[bi, vis, h] @ qg[bi, ti, h, gi] / np.sqrt(d)
                    p = np.exp(sc - sc.max()); p /= p.sum()
                    want[bi, ti, h, gi] = p @ values[bi, vis, h]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
