"""One reward interface for every search method: score a batch of (prompt ids, response ids) -> float per row.

* `as_reward(f)` accepts any Python callable `f(prompt_ids: list[list[int]], response_ids: list[list[int]])
  -> array of floats`, or an object with a `.score` method, and returns a `Reward`.
* `TextReward(fn, tokenizer)` wraps a text function `fn(prompt_text, response_text) -> float` (e.g. VADER).
* `ModelReward` is a JAX scalar-head reward model (loaded from a Hugging Face sequence-classification folder),
  scored at the last real token of prompt + response.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class Reward:
    """Base class: `score(prompt_ids, response_ids) -> np.ndarray [N] float32`."""

    def score(self, prompt_ids, response_ids) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, prompt_ids, response_ids) -> np.ndarray:
        return self.score(prompt_ids, response_ids)


class CallableReward(Reward):
    def __init__(self, fn):
        self.fn = fn

    def score(self, prompt_ids, response_ids):
        out = np.asarray(self.fn(prompt_ids, response_ids), dtype=np.float32).reshape(-1)
        if out.shape[0] != len(response_ids):
            raise ValueError(f"reward function returned {out.shape[0]} scores for {len(response_ids)} responses")
        return out


class TextReward(Reward):
    """A text function of (prompt, response) strings, decoded with the model's tokenizer."""

    def __init__(self, fn, tokenizer):
        if tokenizer is None:
            raise ValueError("a text reward needs a tokenizer to decode token ids; this model has none")
        self.fn, self.tokenizer = fn, tokenizer

    def score(self, prompt_ids, response_ids):
        dec = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        return np.array([self.fn(dec(p), dec(r)) for p, r in zip(prompt_ids, response_ids)], dtype=np.float32)


def vader_reward(tokenizer) -> TextReward:
    """VADER sentiment of the response (compound score in [-1, 1]); the lexicon ships with the package."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return TextReward(lambda prompt, response: analyzer.polarity_scores(response)["compound"], tokenizer)


@functools.partial(jax.jit, static_argnums=0)
def _rm_scores(graphdef, state, tokens, lengths):
    from flax import nnx
    return nnx.merge(graphdef, state).sequence_scores(tokens, lengths)[:, 0]


class ModelReward(Reward):
    """A JAX scalar-head reward model scored at the last token of prompt + response (padded to a power of two)."""

    def __init__(self, graphdef, state, config, tokenizer=None, pad_id: int = 0):
        self.graphdef, self.state, self.config, self.tokenizer, self.pad_id = graphdef, state, config, tokenizer, pad_id

    @classmethod
    def load(cls, source: str, dtype: str = "float32"):
        from rss_jax.loading import load_reward_model
        return cls(*load_reward_model(source, dtype))

    def score(self, prompt_ids, response_ids):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        lengths = np.array([len(s) for s in seqs], np.int32)
        width = 1 << max(int(lengths.max()) - 1, 0).bit_length()
        tokens = np.full((len(seqs), width), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        return np.asarray(_rm_scores(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(lengths)))


def as_reward(reward, tokenizer=None) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str) and reward == "vader":
        return vader_reward(tokenizer)
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(f"reward must be a rss_jax.rewards.Reward, a callable f(prompt_ids, response_ids) or 'vader', "
                    f"got {type(reward).__name__}")
