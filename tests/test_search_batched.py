"""GSI and RSD decode all prompts of a call together: each prompt's result is that of a call with that prompt alone
(prompt_offset = its index), and the counters add up. Tiny random models; the settings are picked so that some steps
accept and some fall back, in the same rounds, and one prompt ends by EOS before the others."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.rewards import Reward
from tests.conftest import VOCAB
from tests.test_search import big, lm  # noqa: F401  (fixtures)

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]  # one bucket: the same shapes alone or batched
KW = dict(n=3, max_new_tokens=16, max_step_tokens=4, eos=[5, 11])
SUMMED = ("steps", "accepted_steps", "small_tokens", "big_tokens", "big_scored_tokens", "small_synced_tokens",
          "big_synced_tokens", "reward_tokens", "tokens_generated", "new_tokens")


class StepMean(Reward):
    """Mean token id / VOCAB of the response, with a `score_steps` (the PRM path) that records, per call, each row's
    prompt and how many steps it already has."""

    def __init__(self):
        self.calls = []

    def score(self, prompt_ids, response_ids):
        return np.asarray([float(np.mean(r)) / VOCAB if len(r) else 0.0 for r in response_ids], np.float32)

    def score_steps(self, prompt_ids, steps):
        self.calls.append({tuple(p): len(s) - 1 for p, s in zip(prompt_ids, steps)})
        return self.score(prompt_ids, [sum(s, []) for s in steps])


def _mixed_round(calls) -> bool:
    """A fallback reward call (same prompts at the same step as the call before) for only some of the prompts that
    drafted in that round: one round where some prompts accepted and others fell back."""
    return any(set(b) < set(a) and all(a[p] == k for p, k in b.items()) for a, b in zip(calls, calls[1:]))


def _compare(method, lm, big, **kw):  # noqa: F811
    batched = method(lm, big, PROMPTS, StepMean(), **KW, **kw)
    singles = [method(lm, big, [p], StepMean(), prompt_offset=b, **KW, **kw) for b, p in enumerate(PROMPTS)]
    for b, one in enumerate(singles):
        np.testing.assert_array_equal(batched.tokens[b], one.tokens[0])
        assert batched.lengths[b] == one.lengths[0]
        assert batched.scores[b] == one.scores[0]
    s = batched.stats
    for name in SUMMED:
        assert s[name] == sum(o.stats[name] for o in singles), name
    assert s["acceptance_rate"] == s["accepted_steps"] / s["steps"]
    assert s["rounds"] == max(o.stats["rounds"] for o in singles) == max(o.stats["steps"] for o in singles)
    assert s["target_forwards"] == s["big_calls"] and s["small_forwards"] == s["small_calls"]
    assert s["small_calls"] < sum(o.stats["small_calls"] for o in singles)
    assert s["reward_calls"] < sum(o.stats["reward_calls"] for o in singles)
    assert s["tokens_generated"] == int(batched.lengths.sum())
    # one prompt ends by EOS while the others go on
    ends = [np.isin(batched.tokens[b], KW["eos"]).any() for b in range(len(PROMPTS))]
    assert any(ends) and batched.lengths[int(np.argmax(ends))] < batched.lengths.max()
    assert 0 < s["accepted_steps"] < s["steps"]
    return batched, singles


def test_gsi_batched_equals_single_prompt_calls(lm, big):  # noqa: F811
    batched, singles = _compare(rj.gsi, lm, big, u=0.5, seed=0)
    s = batched.stats
    assert s["big_tokens"] > 0 and s["small_synced_tokens"] > 0  # fallbacks, read later by the small model
    steps = np.asarray([o.stats["steps"] for o in singles])
    np.testing.assert_allclose(s["ess_mean"], np.dot([o.stats["ess_mean"] for o in singles], steps) / steps.sum(),
                               rtol=1e-6)
    # a round with one reward call for all drafts, then one for the prompts that fell back only
    rec = StepMean()
    rj.gsi(lm, big, PROMPTS, rec, u=0.5, seed=0, **KW)
    assert len(rec.calls[0]) == len(PROMPTS) and _mixed_round(rec.calls)
    assert s["reward_calls"] == len(rec.calls) + 1  # + the final scoring


def test_rsd_batched_equals_single_prompt_calls(lm, big):  # noqa: F811
    batched, singles = _compare(rj.rsd, lm, big, delta=0.55, seed=2)
    s = batched.stats
    assert s["accepted_tokens"] == sum(o.stats["accepted_tokens"] for o in singles)
    assert s["big_synced_tokens"] > 0  # accepted steps read by the big model before a rewrite
    # a prompt that accepts every step and runs every round, next to one that is rewritten: mixed rounds
    acc = [(o.stats["accepted_steps"], o.stats["steps"]) for o in singles]
    assert any(a == k == s["rounds"] for a, k in acc) and any(a < k for a, k in acc)


@pytest.mark.parametrize("method", ["gsi", "rsd"])
def test_prompt_offset_validated(lm, big, method):  # noqa: F811
    with pytest.raises(ValueError, match="prompt_offset"):
        getattr(rj, method)(lm, big, PROMPTS, StepMean(), prompt_offset=-1, **KW)
