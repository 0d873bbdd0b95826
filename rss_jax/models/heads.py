"""Reward-model heads on any backbone: a scalar head (sequence classifiers, value heads) and a two-class head
(process reward models such as Qwen2.5-Math-PRM: Linear(h,h) -> ReLU -> Linear(h,2)).

`RewardModel.token_scores` gives the head's output at every position; `sequence_scores` reads it at the last real
token of each row (lengths[b] - 1), which is what Hugging Face's `...ForSequenceClassification` does with a pad id.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rss_jax.models.base import normal_init


class ScalarHead(nnx.Module):
    """Linear(h, n) with optional bias; n = 1 for a reward model's scalar."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, num_labels: int = 1, bias: bool = False, dtype=jnp.float32):
        self.weight = nnx.Param(normal_init(rngs, (hidden, num_labels), dtype))
        self.bias = nnx.Param(jnp.zeros((num_labels,), dtype)) if bias else None

    def __call__(self, h):
        out = jnp.einsum("bte,en->btn", h, self.weight.value, preferred_element_type=jnp.float32)
        return out + self.bias.value if self.bias is not None else out


class TwoClassHead(nnx.Module):
    """Linear(h, h) -> ReLU -> Linear(h, 2), both with biases."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.w1 = nnx.Param(normal_init(rngs, (hidden, hidden), dtype))
        self.b1 = nnx.Param(jnp.zeros((hidden,), dtype))
        self.w2 = nnx.Param(normal_init(rngs, (hidden, 2), dtype))
        self.b2 = nnx.Param(jnp.zeros((2,), dtype))

    def __call__(self, h):
        x = jax.nn.relu(jnp.einsum("bte,ef->btf", h, self.w1.value) + self.b1.value)
        return jnp.einsum("bte,en->btn", x, self.w2.value, preferred_element_type=jnp.float32) + self.b2.value


class RewardModel(nnx.Module):
    def __init__(self, backbone, head):
        self.backbone = backbone
        self.head = head

    def token_scores(self, tokens):
        """tokens [B, T] -> head outputs [B, T, n] float32 at every position."""
        h, _ = self.backbone(tokens, return_hidden=True)
        return self.head(h).astype(jnp.float32)

    def sequence_scores(self, tokens, lengths):
        """tokens [B, T] right-padded, lengths [B] -> head output at the last real token, [B, n]."""
        out = self.token_scores(tokens)
        idx = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
        return jnp.take_along_axis(out, idx[:, None, None], axis=1)[:, 0]

    def __call__(self, tokens, lengths):
        return self.sequence_scores(tokens, lengths)
