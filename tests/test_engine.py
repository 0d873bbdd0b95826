"""The public functional layer (rss_jax.engine): the loops under the user's own jax.jit, under jax.vmap over seeds,
and inside a user function that does more work around them, give rj.generate's tokens."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax import engine


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return (rj.load(tiny_checkpoints["qwen2_bias"][0]), rj.load(tiny_checkpoints["llama_gqa_llama3rope"][0]),
            rj.load(tiny_checkpoints["llama_mha_linear"][0]))


PROMPTS = [[5, 9, 3], [7, 1, 4, 8, 2], [11, 6]]


def test_decode_under_user_jit_equals_generate(models):
    lm = models[0]
    cfg = engine.ar_config(lm, max_new_tokens=7, temperature=0.9, top_k=20, eos=[])
    tokens, lengths = engine.pad_prompts(engine.encode(lm, PROMPTS))
    run = jax.jit(engine.decode, static_argnums=(0, 1))
    out = run(lm.graphdef, cfg, lm.state, tokens, lengths, jax.random.key(3))
    ref = rj.generate(lm, PROMPTS, max_new_tokens=7, temperature=0.9, top_k=20, eos=[], seed=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), ref.lengths)
    # row ids place rows in a global numbering: rows 1.. of a batch alone, numbered 1..
    part = run(lm.graphdef, cfg, lm.state, tokens[1:], lengths[1:], jax.random.key(3), jnp.arange(1, 3))
    np.testing.assert_array_equal(np.asarray(part.tokens), ref.tokens[1:])
    # prefill alone: the logits of each row's last prompt token, as the uncached forward gives them
    logits, cache = jax.jit(engine.prefill, static_argnums=(0, 4))(lm.graphdef, lm.state, tokens, lengths, 24)
    full = lm.logits(tokens)
    want = np.stack([np.asarray(full[i, n - 1]) for i, n in enumerate(np.asarray(lengths))])
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4)
    assert cache.k.shape[:3] == (lm.config.num_layers, 3, 24)
    with pytest.raises(TypeError, match="typed PRNG key"):
        engine.decode(lm.graphdef, cfg, lm.state, tokens, lengths, jax.random.PRNGKey(0))


def test_speculative_under_vmap_over_seeds_equals_generate(models):
    lm, draft, sft = models
    seeds = [0, 1, 2, 3]
    cfg = engine.spec_config(lm, "sss", draft, sft, k=3, max_new_tokens=6, temperature=1.0, eos=[])
    tokens, lengths = engine.pad_prompts(PROMPTS)
    graphdefs, states = (lm.graphdef, draft.graphdef, sft.graphdef), (lm.state, draft.state, sft.state)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def many(graphdefs, cfg, states, keys):
        return jax.vmap(lambda key: engine.speculative_decode(graphdefs, cfg, states, tokens, lengths, key))(keys)

    out = many(graphdefs, cfg, states, jnp.stack([jax.random.key(s) for s in seeds]))
    assert out.tokens.shape == (4, 3, 6) and out.stats["accepted"].shape == (4, 3)
    for i, s in enumerate(seeds):
        ref = rj.generate(lm, PROMPTS, method="sss", draft=draft, sft=sft, k=3, max_new_tokens=6, temperature=1.0,
                          eos=[], seed=s)
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), ref.tokens)
        assert int(out.stats["accepted"][i].sum()) == ref.stats["accepted"]


def test_sd_and_eft_inside_a_user_function(models):
    """A user's jitted function that perturbs nothing of ours but does work around the sampler: it decodes with SD
    and with EFT and scores the result with the target's own log-probabilities."""
    lm, draft, sft = models
    sd_cfg = engine.spec_config(lm, "sd", draft, k=2, max_new_tokens=5, temperature=0.7, eos=[])
    eft_cfg = engine.spec_config(lm, "eft", draft, sft, max_new_tokens=5, temperature=0.7, eos=[])
    tokens, lengths = engine.pad_prompts(PROMPTS)

    @jax.jit
    def user_fn(states, key):
        k1, k2 = jax.random.split(key)
        sd = engine.speculative_decode((lm.graphdef, draft.graphdef, None), sd_cfg, (states[0], states[1], None),
                                       tokens, lengths, k1)
        eft = engine.speculative_decode((lm.graphdef, draft.graphdef, sft.graphdef), eft_cfg, states, tokens,
                                        lengths, k2)
        first = jnp.maximum(sd.tokens[:, :1], 0)
        logp = jax.nn.log_softmax(engine.prefill(lm.graphdef, states[0], tokens, lengths, 32)[0], axis=-1)
        return sd.tokens, eft.tokens, jnp.take_along_axis(logp, first, axis=1)[:, 0]

    key = jax.random.key(5)
    sd_tokens, eft_tokens, score = user_fn((lm.state, draft.state, sft.state), key)
    k1, k2 = jax.random.split(key)
    # rj.generate's seed is a key's seed: compare through the same keys
    sd_ref = engine.speculative_decode((lm.graphdef, draft.graphdef, None), sd_cfg, (lm.state, draft.state, None),
                                       tokens, lengths, k1)
    np.testing.assert_array_equal(np.asarray(sd_tokens), np.asarray(sd_ref.tokens))
    gen = rj.generate(lm, PROMPTS, method="eft", draft=draft, sft=sft, max_new_tokens=5, temperature=0.7, eos=[],
                      seed=0)
    eft0 = engine.speculative_decode((lm.graphdef, draft.graphdef, sft.graphdef), eft_cfg,
                                     (lm.state, draft.state, sft.state), tokens, lengths, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(eft0.tokens), gen.tokens)
    eft_k2 = engine.speculative_decode((lm.graphdef, draft.graphdef, sft.graphdef), eft_cfg,
                                       (lm.state, draft.state, sft.state), tokens, lengths, k2)
    np.testing.assert_array_equal(np.asarray(eft_tokens), np.asarray(eft_k2.tokens))
    full = jax.nn.log_softmax(lm.logits(tokens), axis=-1)
    first = np.maximum(np.asarray(sd_tokens)[:, 0], 0)
    want = [float(full[i, n - 1, first[i]]) for i, n in enumerate(np.asarray(lengths))]
    np.testing.assert_allclose(np.asarray(score), want, atol=1e-4)
