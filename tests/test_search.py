"""Reward-guided search: Best-of-N / soft BoN, Speculative Rejection, GSI, RSD and the process reward model.

Tiny random models only; the shapes are shared between tests so that few loops compile."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rss_jax as rj
from rss_jax.decoding import best_of_n as bon_mod
from rss_jax.decoding.gsi import gsi_select
from rss_jax.decoding.speculative_rejection import improvement_score, keep_count, schedule
from tests.conftest import VOCAB, randomise

PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
EOS = [5, 11]
N_NEW = 12
STOPS = [2, 4, 8]


def mean_reward(prompt_ids, response_ids):
    """Mean token id / VOCAB: a response-dependent reward with a meaningful partial score."""
    return [float(np.mean(r)) / VOCAB if len(r) else 0.0 for r in response_ids]


def coarse_reward(prompt_ids, response_ids):
    """Few distinct values, so that ties happen."""
    return [float(r[0] % 3) for r in response_ids]


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return rj.load(tiny_checkpoints["llama_mqa_tied"][0])


@pytest.fixture(scope="module")
def big(tiny_checkpoints):
    return rj.load(tiny_checkpoints["qwen2_bias"][0])


@pytest.fixture(scope="module")
def bon16(lm):
    return rj.best_of_n(lm, PROMPTS, mean_reward, n=16, max_new_tokens=N_NEW, eos=EOS, seed=3)


def test_keep_counts_round_half_even_and_schedules():
    assert [keep_count(n, 0.5) for n in (5, 7, 3, 1, 2)] == [2, 4, 2, 1, 1]
    assert keep_count(5, 0.1) == 4 and keep_count(10, 0.15) == 8 and keep_count(10, 0.25) == 8  # 4.5, 8.5, 7.5
    assert keep_count(15, 0.7) == 4  # (1 - 0.7) * 15 = 4.5 exactly with Fraction('0.7'), not 4.500000000000001
    assert schedule(16, 0.5, 12, stops=STOPS) == ([16, 8, 4, 2], [2, 4, 8, 12])
    assert schedule(16, 0.0, 12, stops=STOPS) == ([16], [12])
    assert schedule(3, 0.9, 12, stops=STOPS) == ([3, 1], [2, 12])  # n stops shrinking: the last round runs to the end
    assert schedule(8, 0.5, 12, stops=[4, 20]) == ([8, 4], [4, 12])
    # memory mode: stop_r = min(M // n_r - P, max_new_tokens)
    assert schedule(16, 0.5, 40, kv_budget=16 * 14, prompt_len=10) == ([16, 8, 4], [4, 18, 40])
    with pytest.raises(ValueError, match="kv_budget"):
        schedule(16, 0.5, 40, kv_budget=100, prompt_len=10)
    with pytest.raises(ValueError, match="exactly one"):
        schedule(16, 0.5, 40)
    assert improvement_score([2.0], [[0.0, 1.0, 2.0]]) == 100.0
    assert improvement_score([1.0], [[0.0, 1.0, 2.0]]) == 50.0


def test_bon_prefix_property_ties_and_ar(lm, bon16):
    out = bon16
    assert out.tokens.shape == (2, N_NEW) and out.candidates.shape == (2, 16, N_NEW)
    assert out.stats["generated_tokens"] == int((out.candidates >= 0).sum())
    for b in range(2):
        assert out.scores[b] == out.candidate_scores[b].max()
        np.testing.assert_array_equal(out.tokens[b], out.candidates[b, out.chosen[b]])
    bon8 = rj.best_of_n(lm, PROMPTS, mean_reward, n=8, max_new_tokens=N_NEW, eos=EOS, seed=3)
    np.testing.assert_array_equal(bon8.candidates, out.candidates[:, :8])
    np.testing.assert_allclose(bon8.candidate_scores, out.candidate_scores[:, :8])
    np.testing.assert_allclose(bon8.scores, out.candidate_scores[:, :8].max(axis=1))
    # BoN(1)'s row is rj.generate's row: global row id i * B + b
    ar = rj.generate(lm, PROMPTS, max_new_tokens=N_NEW, eos=EOS, seed=3)
    np.testing.assert_array_equal(out.candidates[:, 0], ar.tokens)
    # ties go to the lowest row
    tie = rj.best_of_n(lm, PROMPTS, coarse_reward, n=16, max_new_tokens=N_NEW, eos=EOS, seed=3)
    np.testing.assert_array_equal(tie.candidates, out.candidates)
    for b in range(2):
        s = tie.candidate_scores[b]
        assert (s == s.max()).sum() > 1 and tie.chosen[b] == np.flatnonzero(s == s.max())[0]
    # EOS rows: the EOS is included and counted; rows never run past it
    lens = (out.candidates >= 0).sum(-1)
    hit = np.isin(out.candidates, EOS)
    assert hit.any()
    for b, i in zip(*np.nonzero(hit.any(-1))):
        assert np.isin(out.candidates[b, i, lens[b, i] - 1], EOS)


def test_spr_alpha0_is_bon(lm, bon16):
    spr = rj.speculative_rejection(lm, PROMPTS, mean_reward, alpha=0.0, n_init=16, stops=STOPS,
                                   max_new_tokens=N_NEW, eos=EOS, seed=3)
    np.testing.assert_array_equal(spr.tokens, bon16.tokens)
    np.testing.assert_array_equal(spr.candidates, bon16.candidates)
    np.testing.assert_array_equal(spr.scores, bon16.scores)
    assert spr.stats["schedule"] == [16]


def test_spr_rows_are_bon_rows_never_better_finished_kept(lm, bon16):
    spr = rj.speculative_rejection(lm, PROMPTS, mean_reward, alpha=0.5, n_init=16, stops=STOPS,
                                   max_new_tokens=N_NEW, eos=EOS, seed=3, reference=bon16)
    assert spr.stats["schedule"] == [16, 8, 4, 2] and len(spr.stats["cutoffs"]) == 3
    assert np.all(spr.scores <= bon16.scores)
    lens = (bon16.candidates >= 0).sum(-1)
    bon_done = np.isin(bon16.candidates, EOS).any(-1)
    for b in range(2):
        final = spr.stats["final_rows"][b]
        assert np.isfinite(spr.candidate_scores[b, final]).all()
        assert not np.isfinite(np.delete(spr.candidate_scores[b], final)).any()
        # a surviving or finished row is BoN's row, token for token, with BoN's score
        np.testing.assert_array_equal(spr.candidates[b, final], bon16.candidates[b, final])
        np.testing.assert_allclose(spr.candidate_scores[b, final], bon16.candidate_scores[b, final])
        # a pruned row holds a prefix of BoN's row
        for i in range(16):
            k = (spr.candidates[b, i] >= 0).sum()
            np.testing.assert_array_equal(spr.candidates[b, i, :k], bon16.candidates[b, i, :k])
        # every row that finished (EOS) before the first decision point is a candidate, never lost
        early = np.flatnonzero(bon_done[b] & (lens[b] <= STOPS[0]))
        assert set(early.tolist()) <= set(final)
        assert spr.scores[b] == spr.candidate_scores[b].max()
    assert spr.stats["generated_tokens"] < bon16.stats["generated_tokens"]
    assert spr.stats["bon_best_survived"] == [bool(np.argmax(bon16.candidate_scores[b]) in spr.stats["final_rows"][b])
                                              for b in range(2)]


def test_soft_bon_law(lm):
    """Soft BoN with n = 2 on one-token responses: the chosen token's reward class follows
    P(y) = 2 sum_y2 pi(y) pi(y2) e^{beta r(y)} / (e^{beta r(y)} + e^{beta r(y2)})."""
    prompt, beta, reps = [3, 14, 15], 1.5, 6000
    pi = np.asarray(jax.nn.softmax(lm.logits([prompt])[0, -1]), np.float64)
    pi /= pi.sum()
    r = (np.arange(VOCAB) % 3).astype(np.float64)
    e = np.exp(beta * r)
    law = 2 * pi * (pi[None, :] * e[:, None] / (e[:, None] + e[None, :])).sum(axis=1)
    out = rj.best_of_n(lm, [prompt] * reps, lambda p, resp: [float(x[0] % 3) for x in resp], n=2, beta=beta,
                       max_new_tokens=1, eos=[], seed=5)
    cls = out.tokens[:, 0] % 3
    for c in range(3):
        p = law[np.arange(VOCAB) % 3 == c].sum()
        freq = np.mean(cls == c)
        assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / reps), (c, freq, p)
    # the plain argmax law differs (beta -> infinity)
    hard = bon_mod.soft_choice(out.candidate_scores, None, 5)
    assert np.mean(out.candidate_scores[np.arange(reps), hard] == 2) > np.mean(out.scores == 2)


def _toy(n, trials, pi_s, pi_b, r, beta, key, u=-np.inf):
    ks, kp = jax.random.split(key)
    y = jax.random.categorical(ks, jnp.log(jnp.asarray(pi_s, jnp.float32)), shape=(trials, n))
    keys = jax.random.split(kp, trials)
    rr = jnp.asarray(r, jnp.float32)[y]
    lb, ls = jnp.log(jnp.asarray(pi_b, jnp.float32))[y], jnp.log(jnp.asarray(pi_s, jnp.float32))[y]
    idx, acc, tilted, ess = jax.vmap(gsi_select, in_axes=(0, 0, 0, 0, None, None))(
        keys, rr, lb, ls, jnp.float32(beta), jnp.float32(u))
    chosen = np.asarray(jnp.take_along_axis(y, idx[:, None], axis=1)[:, 0])
    return chosen, np.asarray(acc), np.asarray(idx), keys, rr


def test_gsi_categorical_toy_converges_to_tilted_law():
    rng = np.random.default_rng(0)
    v, beta, trials = 6, 3.0, 40000
    pi_s, pi_b = rng.dirichlet(4 * np.ones(v)), rng.dirichlet(4 * np.ones(v))
    r = rng.uniform(0, 1, v)
    target = pi_b * np.exp(beta * r)
    target /= target.sum()
    kls = []
    for n in (1, 4, 16, 64):
        chosen, acc, _, _, _ = _toy(n, trials, pi_s, pi_b, r, beta, jax.random.key(n))
        assert acc.all()
        law = np.bincount(chosen, minlength=v) / trials
        kls.append(float(np.sum(target * np.log(target / np.maximum(law, 1e-12)))))
    assert kls[0] > 0.1 and all(a > b for a, b in zip(kls, kls[1:])) and kls[-1] < 1e-3, kls
    # with a threshold some steps are rejected; rejection depends on u
    _, acc, _, _, _ = _toy(16, 2000, pi_s, pi_b, r, beta, jax.random.key(1), u=0.6)
    assert 0 < acc.mean() < 1


def test_gsi_candidates_outside_the_big_models_support():
    """A big model filtered by top_k/top_p gives log pi_B = -inf to some candidates: they get weight 0 and are never
    picked while another candidate has support; with none supported the step is rejected (the big model samples
    it) and the effective sample size is 0, with no NaN anywhere."""
    keys = jax.random.split(jax.random.key(3), 200)
    rewards = jnp.tile(jnp.asarray([[5.0, 0.1, 0.2, 9.0]]), (200, 1))
    small = jnp.log(jnp.full((200, 4), 0.25))
    some = jnp.tile(jnp.asarray([[-jnp.inf, -1.0, -2.0, -jnp.inf]]), (200, 1))
    idx, acc, _, ess = jax.vmap(gsi_select, in_axes=(0, 0, 0, 0, None, None))(
        keys, rewards, some, small, jnp.float32(2.0), jnp.float32(-jnp.inf))
    assert set(np.asarray(idx).tolist()) <= {1, 2} and np.asarray(acc).all()
    assert np.isfinite(np.asarray(ess)).all() and (np.asarray(ess) >= 1).all()
    none = jnp.full((200, 4), -jnp.inf)
    idx, acc, _, ess = jax.vmap(gsi_select, in_axes=(0, 0, 0, 0, None, None))(
        keys, rewards, none, small, jnp.float32(2.0), jnp.float32(-jnp.inf))
    assert not np.asarray(acc).any() and (np.asarray(ess) == 0).all()


def test_gsi_with_equal_models_is_soft_bon():
    rng = np.random.default_rng(1)
    v, beta = 5, 3.0
    pi = rng.dirichlet(np.ones(v))
    r = rng.uniform(0, 1, v)
    _, _, idx, keys, rr = _toy(8, 500, pi, pi, r, beta, jax.random.key(2))
    soft = jax.vmap(lambda k, x: jax.random.categorical(k, beta * x))(keys, rr)
    np.testing.assert_array_equal(idx, np.asarray(soft))


def test_gsi_runs_and_reports(lm, big):
    out = rj.gsi(lm, big, PROMPTS, mean_reward, n=4, beta=20.0, u=0.45, max_new_tokens=N_NEW, eos=EOS,
                 max_step_tokens=4, seed=1)
    assert out.tokens.shape == (2, N_NEW)
    s = out.stats
    assert 0 <= s["acceptance_rate"] <= 1 and s["steps"] >= 2 and 1 <= s["ess_mean"] <= 4
    assert s["big_scored_tokens"] == s["small_tokens"]  # the big model scores every candidate token
    np.testing.assert_allclose(out.scores, mean_reward(PROMPTS, [t[t >= 0] for t in out.tokens]), rtol=1e-6)
    always = rj.gsi(lm, big, PROMPTS, mean_reward, n=4, u=-1e9, max_new_tokens=N_NEW, eos=EOS, max_step_tokens=4)
    assert always.stats["acceptance_rate"] == 1.0 and always.stats["big_tokens"] == 0


def test_rsd_thresholds(lm, big):
    kw = dict(max_new_tokens=N_NEW, eos=EOS, max_step_tokens=4, seed=2)
    low = rj.rsd(lm, big, PROMPTS, mean_reward, delta=-1.0, **kw)
    assert low.stats["acceptance_rate"] == 1.0 and low.stats["token_acceptance_rate"] == 1.0
    assert low.stats["big_tokens"] == 0
    high = rj.rsd(lm, big, PROMPTS, mean_reward, delta=2.0, **kw)
    assert high.stats["acceptance_rate"] == 0.0 and high.stats["token_acceptance_rate"] == 0.0
    assert high.stats["big_tokens"] == int(high.lengths.sum()) and high.stats["steps"] >= 3
    # every rejected step was written by the big model: with delta above all rewards the steps are big's samples,
    # whatever the small model drafted
    for out in (low, high):
        assert (out.lengths >= 1).all() and ((out.tokens >= 0).sum(1) == out.lengths).all()


def _save_prm(folder, head):
    """A tiny Qwen2 backbone with a PRM head, saved like Qwen2.5-Math-PRM (score.0/score.2) or a value-head PRM."""
    import json
    import os

    import torch
    import transformers
    from safetensors.torch import save_file
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    lm_model = randomise(transformers.Qwen2ForCausalLM(cfg), seed=11)
    tensors = {k: v.contiguous() for k, v in lm_model.state_dict().items() if not k.startswith("lm_head")}
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    if head == "two_class":
        tensors.update({"score.0.weight": rand(32, 32), "score.0.bias": rand(32), "score.2.weight": rand(2, 32),
                        "score.2.bias": rand(2)})
    else:
        tensors.update({"v_head.summary.weight": rand(1, 32), "v_head.summary.bias": rand(1)})
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return lm_model.model, {k: v.numpy() for k, v in tensors.items() if k.startswith(("score", "v_head"))}


@pytest.mark.parametrize("head", ["two_class", "sigmoid"])
def test_process_reward_model_matches_transformers(tmp_path, head):
    import torch
    backbone, h = _save_prm(str(tmp_path / head), head)
    sep = 7
    prm = rj.rewards.ProcessReward.load(str(tmp_path / head), sep_id=sep, prefix_ids=[1], step_end_ids=[9])
    assert prm.head == head
    prompts = [[3, 4, 5], [6, 8]]
    steps = [[[10, 11, 9], [12, 9], [13]], [[20, 21, 22, 9]]]
    ours = prm.step_scores(prompts, steps)
    for p, ss, got in zip(prompts, steps, ours):
        ids, seps = prm.layout(p, ss)
        assert ids[seps[0]] == sep and len(seps) == len(ss)
        with torch.no_grad():
            hid = backbone(torch.tensor([ids])).last_hidden_state[0].numpy().astype(np.float64)
        if head == "two_class":
            hidden = np.maximum(hid @ h["score.0.weight"].T + h["score.0.bias"], 0)
            z = hidden @ h["score.2.weight"].T + h["score.2.bias"]
            ref = np.exp(z[:, 1]) / np.exp(z).sum(axis=1)
        else:
            ref = 1 / (1 + np.exp(-(hid @ h["v_head.summary.weight"].T + h["v_head.summary.bias"])[:, 0]))
        np.testing.assert_allclose(got, ref[seps], atol=1e-4)
    # score() splits the response after step-end ids and returns the last step's score
    flat = [sum(ss, []) for ss in steps]
    np.testing.assert_allclose(prm.score(prompts, flat), [o[-1] for o in ours], atol=1e-6)
