"""The SSS paper's other baselines: ARGS, CARDS, item-level rejection sampling and TreeBoN.

Tiny random models; oracles are transformers' logits, NumPy recomputations and plain sequential reference loops."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from tests.conftest import VOCAB, randomise

PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
EOS = [5, 11]
N_NEW = 10


def last_token_reward(prompt_ids, response_ids):
    """A reward of the response's last token, so that ARGS's candidates differ."""
    return [((r[-1] * 7) % 13) / 13.0 if len(r) else 0.0 for r in response_ids]


def mean_reward(prompt_ids, response_ids):
    return [float(np.mean(r)) / VOCAB if len(r) else 0.0 for r in response_ids]


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return rj.load(tiny_checkpoints["llama_mqa_tied"][0])


@pytest.fixture(scope="module")
def torch_lm(tiny_checkpoints):
    return tiny_checkpoints["llama_mqa_tied"][1]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                                   max_position_embeddings=128)
    model = randomise(transformers.LlamaForSequenceClassification(cfg), seed=11)
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path, safe_serialization=True)
    return rj.rewards.ModelReward.load(str(path))


def greedy_reference(lm, prompts, n_new, eos):
    return rj.generate(lm, prompts, method="ar", temperature=0.0, max_new_tokens=n_new, eos=eos)


# ------------------------------------------------------------------------------------------------------------------
# ARGS
# ------------------------------------------------------------------------------------------------------------------


def test_args_w0_and_k1_are_greedy(lm, reward_model):
    ref = greedy_reference(lm, PROMPTS, N_NEW, EOS)
    for reward, kw in ((last_token_reward, dict(weight=0.0)), (last_token_reward, dict(k=1, weight=5.0)),
                       (reward_model, dict(weight=0.0)), (reward_model, dict(k=1, weight=5.0))):
        out = rj.args(lm, PROMPTS, reward, max_new_tokens=N_NEW, eos=EOS, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_args_cached_rewards_equal_full_reread(lm, reward_model):
    out = rj.args(lm, PROMPTS, reward_model, k=5, weight=3.0, max_new_tokens=N_NEW, eos=EOS, return_trace=True)
    cands, rewards = out.stats["trace"]["candidates"], out.stats["trace"]["rewards"]
    changed = 0
    for b, prompt in enumerate(PROMPTS):
        for t in range(out.lengths[b]):
            prefix = out.tokens[b, :t].tolist()
            full = reward_model.score([prompt] * 5, [prefix + [int(v)] for v in cands[b, t]])
            np.testing.assert_allclose(rewards[b, t], full, atol=2e-5)
        # the reward changed the choice somewhere: the search is not greedy decoding
        changed += int(out.tokens[b, 0] != cands[b, 0, 0])
    greedy = greedy_reference(lm, PROMPTS, N_NEW, EOS)
    assert changed > 0 or not np.array_equal(out.tokens, greedy.tokens)
    # the host path (the same reward model called on re-read prefixes) makes the same choices
    host = rj.args(lm, PROMPTS, lambda p, r: reward_model.score(p, r), k=5, weight=3.0, max_new_tokens=N_NEW,
                   eos=EOS)
    np.testing.assert_array_equal(host.tokens, out.tokens)
    np.testing.assert_allclose(out.scores, reward_model.score(PROMPTS, [row[:n].tolist() for row, n in zip(
        out.tokens, out.lengths)]), atol=2e-5)
    # counters: one prompt pass + one call of k rows per position (cached); k rows per live prompt (host)
    steps = out.stats["steps"]
    assert steps == int(out.lengths.max())
    assert out.stats["target_forwards"] == 1 + steps and out.stats["reward_calls"] == 1 + steps
    assert out.stats["reward_tokens"] == sum(map(len, PROMPTS)) + steps * 2 * 5
    assert host.stats["reward_rows"] == 5 * int(out.lengths.sum())


def test_args_stochastic_first_token_law(lm, torch_lm):
    import torch
    k, w, tau, rows = 6, 2.0, 0.7, 4000
    prompt = [3, 8, 1]
    out = rj.args(lm, [prompt] * rows, last_token_reward, k=k, weight=w, greedy=False, tau=tau, max_new_tokens=1,
                  eos=[], seed=5)
    with torch.no_grad():
        logits = torch_lm(torch.tensor([prompt])).logits[0, -1].numpy().astype(np.float64)
    top = np.argsort(-logits, kind="stable")[:k]
    s = logits[top] + w * np.array(last_token_reward(None, [[v] for v in top]))
    p = np.exp((s - s.max()) / tau)
    p /= p.sum()
    freq = np.array([(out.tokens[:, 0] == v).mean() for v in top])
    assert freq.sum() == 1.0  # every draw is one of the top-k
    # each frequency within 4.5 standard errors of softmax(s / tau)
    se = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-9), (freq, p)


def test_args_authors_code_counts_and_errors(lm):
    out = rj.args(lm, PROMPTS, last_token_reward, mode="authors_code", max_new_tokens=N_NEW, k=4)
    # no EOS stop: every row runs the whole budget; one target step and one reward call per position
    assert (out.lengths == N_NEW).all()
    assert out.stats["target_forwards"] == 1 + N_NEW and out.stats["reward_calls"] == N_NEW
    assert out.stats["reward_rows"] == N_NEW * 2 * 4
    with pytest.raises(ValueError, match="greedy"):
        rj.args(lm, PROMPTS, last_token_reward, mode="authors_code", greedy=False)
    with pytest.raises(ValueError, match="mode"):
        rj.args(lm, PROMPTS, last_token_reward, mode="fast")
    with pytest.raises(ValueError, match="k="):
        rj.args(lm, PROMPTS, last_token_reward, k=VOCAB + 1)
