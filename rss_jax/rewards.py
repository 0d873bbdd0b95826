"""One reward interface for every search method: score a batch of (prompt ids, response ids) -> float per row.

* `as_reward(f)` accepts any Python callable `f(prompt_ids: list[list[int]], response_ids: list[list[int]])
  -> array of floats`, or an object with a `.score` method, and returns a `Reward`.
* `TextReward(fn, tokenizer)` wraps a text function `fn(prompt_text, response_text) -> float` (e.g. VADER).
* `ModelReward` is a JAX scalar-head reward model (loaded from a Hugging Face sequence-classification folder),
  scored at the last real token of prompt + response.
* `ProcessReward` is a process reward model: a two-class head (softmax(.)[1]) or a scalar value head (sigmoid) read
  at the separator token that follows every step; `score` gives the last step's score, `step_scores` every step's.
  GSI and RSD call `score_steps(prompt_ids, steps)` when a reward has it, so the PRM sees the real step boundaries.
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


def vader_compound():
    """text -> VADER's compound sentiment score in [-1, 1] (the lexicon ships with the package)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


def vader_reward(tokenizer) -> TextReward:
    """VADER sentiment of the response (compound score in [-1, 1]); the prompt is not read."""
    compound = vader_compound()
    return TextReward(lambda prompt, response: compound(response), tokenizer)


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


def _pad_batch(seqs, pad_id):
    lengths = np.array([len(x) for x in seqs], np.int32)
    width = 1 << max(int(lengths.max()) - 1, 0).bit_length()
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    for i, x in enumerate(seqs):
        tokens[i, : len(x)] = x
    return tokens, lengths


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prm_token_scores(graphdef, head, state, tokens):
    from flax import nnx
    out = nnx.merge(graphdef, state).token_scores(tokens)  # [B, T, n] float32
    if head == "two_class":
        return jax.nn.softmax(out, axis=-1)[..., 1]
    return jax.nn.sigmoid(out[..., 0])


class ProcessReward(Reward):
    """A process reward model: per-step scores read at separator positions (docs/algorithms.md §8).

    The scored sequence is, in token ids,
        prefix_ids + prompt_ids + prompt_suffix_ids + step_1 + [sep_id] + step_2 + [sep_id] + ...
    (Qwen2.5-Math-PRM: the chat-templated problem as prompt and `<extra_0>` as sep_id; Skywork-o1-Open-PRM: BOS as
    prefix, the "\n" ids as prompt suffix and the id of "\n\n" as sep_id). The step score is softmax(head)[1] at
    each separator for a two-class head, sigmoid(value) for a scalar value head (`head`: "two_class" | "sigmoid").
    `score(prompt_ids, response_ids)` splits a response into steps after every token in `step_end_ids` (or treats
    it as one step) and returns the last step's score, which is what GSI and RSD use.
    """

    def __init__(self, graphdef, state, config, sep_id: int, head: str = "two_class", tokenizer=None,
                 prefix_ids=(), prompt_suffix_ids=(), step_end_ids=(), pad_id: int = 0):
        if head not in ("two_class", "sigmoid"):
            raise ValueError(f"head must be 'two_class' or 'sigmoid', got {head!r}")
        self.graphdef, self.state, self.config, self.tokenizer = graphdef, state, config, tokenizer
        self.sep_id, self.head, self.pad_id = int(sep_id), head, pad_id
        self.prefix_ids, self.prompt_suffix_ids = list(prefix_ids), list(prompt_suffix_ids)
        self.step_end_ids = set(int(t) for t in step_end_ids)

    @classmethod
    def load(cls, source: str, sep_id: int, head: str = "auto", dtype: str = "float32", **kw):
        """From a folder with a `score.0/2.*` two-class head or a `v_head.*` value head (see load_reward_model)."""
        from rss_jax.loading import load_reward_model
        graphdef, state, config, tokenizer = load_reward_model(source, dtype, head="auto" if head in (
            "auto", "two_class", "sigmoid") else head)
        from flax import nnx
        from rss_jax.models.heads import TwoClassHead
        kind = "two_class" if isinstance(nnx.merge(graphdef, state).head, TwoClassHead) else "sigmoid"
        if head in ("two_class", "sigmoid") and head != kind:
            raise ValueError(f"{source}: asked for a {head} head but the checkpoint holds a {kind} head")
        return cls(graphdef, state, config, sep_id, kind, tokenizer, **kw)

    def layout(self, prompt, steps):
        """-> (token ids, separator positions) of one (prompt, [step, ...])."""
        ids = self.prefix_ids + list(prompt) + self.prompt_suffix_ids
        seps = []
        for step in steps:
            ids += list(step)
            seps.append(len(ids))
            ids.append(self.sep_id)
        return ids, seps

    def step_scores(self, prompt_ids, steps) -> list:
        """prompt_ids [N] lists, steps [N] lists of steps (lists of ids) -> [N] arrays of per-step scores."""
        laid = [self.layout(p, s) for p, s in zip(prompt_ids, steps)]
        tokens, _ = _pad_batch([ids for ids, _ in laid], self.pad_id)
        out = np.asarray(_prm_token_scores(self.graphdef, self.head, self.state, jnp.asarray(tokens)))
        return [out[i, seps].astype(np.float32) for i, (_, seps) in enumerate(laid)]

    def split_steps(self, response):
        steps, cur = [], []
        for t in response:
            cur.append(int(t))
            if int(t) in self.step_end_ids:
                steps.append(cur)
                cur = []
        if cur or not steps:
            steps.append(cur)
        return steps

    def score_steps(self, prompt_ids, steps) -> np.ndarray:
        """The last step's score of each row, [N] float32."""
        return np.array([s[-1] for s in self.step_scores(prompt_ids, steps)], np.float32)

    def score(self, prompt_ids, response_ids):
        return self.score_steps(prompt_ids, [self.split_steps(r) for r in response_ids])


def as_reward(reward, tokenizer=None) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str) and reward == "vader":
        return vader_reward(tokenizer)
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(f"reward must be a rss_jax.rewards.Reward, a callable f(prompt_ids, response_ids) or 'vader', "
                    f"got {type(reward).__name__}")
