"""The two ways a decode loop runs the layers: a scan over the stacked weights, or an unrolled loop (the CPU default)
whose products read each layer in place through the CPU kernels (or, without them, per-layer buffers sliced once
before the loop). Both must give transformers' tokens and logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax.cache import init_cache
from rss_jax.decoding import common
from rss_jax.models import base
from tests.conftest import VOCAB


def _hf_greedy(torch_model, prompt, n):
    import torch
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf_logits(torch_model, tokens):
    import torch
    with torch.no_grad():
        return torch_model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture
def loop_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv(base.LAYER_LOOP_ENV, mode)
        common.COMPILED.entries.clear()  # the mode is read while tracing: drop loops traced under the other one
        jax.clear_caches()
    yield set_mode
    common.COMPILED.entries.clear()


@pytest.mark.parametrize("mode", ["scan", "unroll"])
@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "qwen2_bias", "gpt2", "opt350m_style"])
def test_greedy_equals_transformers_either_loop(tiny_checkpoints, loop_mode, name, mode):
    loop_mode(mode)
    path, torch_model = tiny_checkpoints[name]
    lm = rj.load(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, VOCAB, n).tolist() for n in (5, 9)]
    out = rj.generate(lm, prompts, max_new_tokens=10, temperature=0.0, eos=[])
    for row, prompt in enumerate(prompts):
        assert out.tokens[row].tolist() == _hf_greedy(torch_model, prompt, 10), f"{mode} row {row}"


@pytest.mark.parametrize("mode", ["scan", "unroll"])
def test_cached_steps_match_transformers_logits_either_loop(tiny_checkpoints, monkeypatch, mode):
    """Prefill 6 tokens, then 3 single cached steps inside one jitted fori_loop (the slices are made before the
    loop): every step's logits equal transformers' full forward within 1e-4, and taps come back for each layer."""
    monkeypatch.setenv(base.LAYER_LOOP_ENV, mode)
    path, torch_model = tiny_checkpoints["mistral_head_dim"]
    lm = rj.load(path)
    tokens = np.random.default_rng(2).integers(2, VOCAB, 9).tolist()

    @jax.jit
    def run(state):
        model = base.decode_model(lm.graphdef, state)
        assert (model.__dict__.get("_layer_list") is not None) == (mode == "unroll")
        cache = init_cache(lm.config, 1, 16)
        logits0, cache = model(jnp.asarray([tokens[:6]]), cache=cache, lengths=jnp.zeros((1,), jnp.int32))

        def step(i, carry):
            cache, out, taps_out = carry
            tok = jax.lax.dynamic_slice(jnp.asarray(tokens), (6 + i,), (1,))[None]
            logits, cache, taps = model(tok, cache=cache, lengths=jnp.full((1,), 6 + i, jnp.int32), taps=(0, 1))
            return cache, out.at[i].set(logits[0, 0]), taps_out.at[i].set(taps[0, 0])
        e = lm.config.hidden_size
        _, steps, taps = jax.lax.fori_loop(0, 3, step, (cache, jnp.zeros((3, VOCAB)), jnp.zeros((3, 2, e))))
        return logits0[0], steps, taps

    first, steps, taps = run(lm.state)
    ref = _hf_logits(torch_model, tokens)
    np.testing.assert_allclose(np.asarray(first), ref[:6], atol=1e-4)
    np.testing.assert_allclose(np.asarray(steps), ref[6:9], atol=1e-4)
    import torch
    with torch.no_grad():
        hidden = torch_model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    for j, layer in enumerate((0, 1)):  # hidden_states[l + 1] is the residual stream after layer l
        want = hidden[layer + 1][0, 6:9].numpy()
        if layer == lm.config.num_layers - 1:  # transformers applies the final norm to the last entry
            continue
        np.testing.assert_allclose(np.asarray(taps[:, j]), want, atol=1e-4)


def test_unroll_policy(monkeypatch):
    monkeypatch.setenv(base.LAYER_LOOP_ENV, "scan")
    assert not base.unroll_layers(1)
    monkeypatch.setenv(base.LAYER_LOOP_ENV, "unroll")
    assert base.unroll_layers(1 << 60)
    monkeypatch.setenv(base.LAYER_LOOP_ENV, "auto")
    assert base.unroll_layers(1) == (jax.default_backend() == "cpu")
    assert not base.unroll_layers(1 << 60)  # two copies would not fit in the host's memory
    assert not base.unroll_layers(1, float32=False)  # bfloat16 keeps the scan without the CPU kernels
    # with the kernels reading each layer in place there is no second copy, so no memory limit, and bfloat16 too
    assert base.unroll_layers(1 << 60, float32=False, in_place=True) == (jax.default_backend() == "cpu")
    monkeypatch.setenv(base.LAYER_LOOP_ENV, "fast")
    with pytest.raises(ValueError, match="RSS_JAX_LAYER_LOOP='fast'.*auto, unroll or scan"):
        base.unroll_layers(1)


def test_write_block_matches_a_numpy_loop_and_drops_slots_past_capacity():
    """The cache writer against a plain loop: each row's T new entries land at lengths[b].., the rest of the cache is
    untouched, and entries at or past the capacity are dropped (a clamped write would shift them onto valid slots).
    Both forms: one layer's cache, and one layer of a stacked cache."""
    from rss_jax.cache import write_block
    rng = np.random.default_rng(0)
    L, B, S, KVH, D, T = 3, 4, 6, 2, 3, 3
    stacked = rng.normal(size=(L, B, S, KVH, D)).astype(np.float32)
    new = rng.normal(size=(B, T, KVH, D)).astype(np.float32)
    lengths = np.array([0, 2, 4, 6], np.int32)  # row 2 overflows by one, row 3 entirely

    def oracle(c):
        c = c.copy()
        for b in range(B):
            for t in range(T):
                if lengths[b] + t < S:
                    c[b, lengths[b] + t] = new[b, t]
        return c
    got_one = np.asarray(jax.jit(write_block)(jnp.asarray(stacked[1]), jnp.asarray(new), jnp.asarray(lengths)))
    np.testing.assert_array_equal(got_one, oracle(stacked[1]))
    got = np.asarray(jax.jit(write_block, static_argnums=3)(jnp.asarray(stacked), jnp.asarray(new),
                                                            jnp.asarray(lengths), 1))
    np.testing.assert_array_equal(got[1], oracle(stacked[1]))
    np.testing.assert_array_equal(got[[0, 2]], stacked[[0, 2]])


def test_fused_short_attention_equals_the_einsum_path():
    """The CPU path for a few new tokens over a cache against the general einsum path, on random inputs with ragged
    per-row lengths (so the mask matters), at T = 1 and T = 5 (a verification block)."""
    from rss_jax.models import layers
    rng = np.random.default_rng(1)
    B, S, KVH, G, D = 3, 11, 2, 3, 8
    keys = jnp.asarray(rng.normal(size=(B, S, KVH, D)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(B, S, KVH, D)), jnp.float32)
    for t, lengths in ((1, [0, 4, 10]), (5, [0, 3, 6])):
        qg = jnp.asarray(rng.normal(size=(B, t, KVH, G, D)), jnp.float32)
        q_slot = jnp.asarray(lengths)[:, None] + jnp.arange(t)[None, :]
        mask = jnp.arange(S)[None, None, :] <= q_slot[:, :, None]
        got = layers._fused_short_attention(qg, keys, values, mask)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys) / np.sqrt(D)
        scores = jnp.where(mask[:, None, None], scores, -1e30)
        want = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, -1), values)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
