"""The training losses of docs/algorithms.md §9: DPO (sigmoid with label smoothing, IPO, hinge), masked next-token
cross-entropy, and distillation toward a teacher (KL or total variation).

Every function is pure and jittable; probabilities and log-probabilities are computed in float32.
Masks follow one convention: `loss_mask[b, t] = 1` when token t of row b is a response token, i.e. a token the
model is trained to predict from tokens 0..t-1. Token 0 can never be predicted, so loss_mask[:, 0] is ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rss_jax.likelihood import sequence_logps, token_logps  # noqa: F401 (the training API names them too)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """DPO on per-example summed response log-probs, each [P] (P pairs).

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected);
    sigmoid: -(1-eps) log sigma(beta h) - eps log sigma(-beta h); ipo: (h - 1/(2 beta))^2; hinge: max(0, 1 - beta h).
    Returns (loss: scalar mean over pairs, metrics: dict of scalars "rewards/chosen", "rewards/rejected", "margin",
    "accuracy", plus "losses" [P] per pair).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    f32 = jnp.float32
    chosen_ratio = jnp.asarray(policy_chosen, f32) - jnp.asarray(ref_chosen, f32)
    rejected_ratio = jnp.asarray(policy_rejected, f32) - jnp.asarray(ref_rejected, f32)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        losses = jnp.maximum(0.0, 1.0 - beta * h)
    # Rewards are reported, never differentiated.
    rewards_chosen = jax.lax.stop_gradient(beta * chosen_ratio)
    rewards_rejected = jax.lax.stop_gradient(beta * rejected_ratio)
    margins = rewards_chosen - rewards_rejected
    metrics = {
        "rewards/chosen": jnp.mean(rewards_chosen),
        "rewards/rejected": jnp.mean(rewards_rejected),
        "margin": jnp.mean(margins),
        "accuracy": jnp.mean((margins > 0).astype(f32)),
        "losses": losses,
    }
    return jnp.mean(losses), metrics


def masked_ce_sum(logits, tokens, loss_mask):
    """Summed next-token cross-entropy over response tokens (divide by the token count for the mean)."""
    return -jnp.sum(sequence_logps(logits, tokens, loss_mask))


def distill_sum(student_logits, teacher_logits, loss_mask, kind: str = "kl"):
    """Summed per-position divergence between the teacher's and the student's next-token distributions over the
    positions that predict response tokens.

    kind="kl": KL(teacher || student) = sum_v p_t (log p_t - log p_s) (forward KL, as in DistillSpec's FKL);
    kind="tv": total variation 0.5 sum_v |p_t - p_s|, whose complement 1 - TV is the speculative acceptance rate.
    """
    s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32), axis=-1)
    pt = jnp.exp(t)
    if kind == "kl":
        # A student with a trimmed head (logit -inf outside its vocabulary) is fitted to the teacher restricted to
        # that vocabulary and renormalised; for a full-vocabulary student this is the plain KL.
        support = s > -jnp.inf
        s_in = jnp.where(support, s, 0.0)  # no -inf - -inf anywhere, so no NaN in the gradient either
        t_in = jnp.where(support, t, -jnp.inf)
        t_in = t_in - jax.nn.logsumexp(t_in, axis=-1, keepdims=True)
        t_in = jnp.where(support, t_in, 0.0)
        per_pos = jnp.sum(jnp.where(support, jnp.exp(t_in) * (t_in - s_in), 0.0), axis=-1)
    elif kind == "tv":
        per_pos = 0.5 * jnp.sum(jnp.abs(pt - jnp.exp(s)), axis=-1)
    else:
        raise ValueError(f"distillation loss must be 'kl' or 'tv', got {kind!r}")
    return jnp.sum(per_pos * loss_mask[:, 1:].astype(jnp.float32))


def acceptance(p_logits, q_logits, mask=None):
    """Mean per-position speculative acceptance alpha = sum_v min(p(v), q(v)) of a draft q against a target p
    (logits [..., V]); `mask` [...] selects the positions that count."""
    p = jax.nn.softmax(p_logits.astype(jnp.float32), axis=-1)
    q = jax.nn.softmax(q_logits.astype(jnp.float32), axis=-1)
    a = jnp.sum(jnp.minimum(p, q), axis=-1)
    if mask is None:
        return jnp.mean(a)
    mask = mask.astype(jnp.float32)
    return jnp.sum(a * mask) / jnp.maximum(jnp.sum(mask), 1.0)
