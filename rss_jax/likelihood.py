"""How likely a model finds given responses: `response_nll(lm, prompts, responses)`.

The weak-to-strong report uses it as a fluency check. A method that games the gold reward (strings of positive
words) scores well on the reward but reads badly to the unaligned target, and that shows as a higher negative
log-likelihood per response token under the target at temperature 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.decoding.common import encode_prompts, is_single_prompt


def token_logps(logits, tokens):
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: logits [B, T, V], tokens [B, T] -> [B, T-1] float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(logits, tokens, loss_mask):
    """Summed log-prob of the response tokens of each row (loss_mask[b, t] = 1 when token t is scored): [B, T, V],
    [B, T], [B, T] -> [B] float32. Unscored positions are dropped with a select, not a product: their log-probs may
    be -inf (a token outside a trimmed head) or NaN (padding past a learned position table), and 0 * inf = NaN."""
    return jnp.sum(jnp.where(loss_mask[:, 1:] > 0, token_logps(logits, tokens), 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(graphdef, state, tokens, mask):
    """tokens [B, T], mask [B, T] (1 where tokens[t] is a scored response token) -> summed NLL per row [B]."""
    return -sequence_logps(nnx.merge(graphdef, state)(tokens)[0], tokens, mask)


def _bucket(n: int, step: int = 64) -> int:
    return -(-n // step) * step


def response_nll(lm, prompts, responses, batch_size: int = 16, chat: bool = True, progress: str | None = None):
    """Negative log-likelihood of each response given its prompt under `lm` at temperature 1.

    prompts: strings (chat template applied, as in `rss_jax.generate`) or lists of token ids; responses: strings
    (tokenized without special tokens) or lists of token ids (entries < 0 are padding and dropped), one per prompt.
    A single prompt may be passed bare (a string, or one flat list of ids) with its single response.
    Returns (nll [N] float64: the sum over each response's tokens, tokens [N] int64: how many were scored). The mean
    per token of response i is nll[i] / tokens[i]; an empty response scores 0 over 0 tokens.

    Rows are padded to a fixed batch and to lengths rounded up to 64, so a long evaluation compiles a few shapes.
    `progress`: a label for a progress bar over the batches (None: no bar)."""
    from rss_jax import sharding
    if is_single_prompt(prompts):
        prompts, responses = [prompts], [responses]
    if len(prompts) != len(responses):
        raise ValueError(f"response_nll got {len(prompts)} prompts and {len(responses)} responses; pass one "
                         "response per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    prompt_ids = encode_prompts(lm, list(prompts), chat=chat)
    resp_ids = []
    for i, r in enumerate(responses):
        if isinstance(r, str):
            if lm.tokenizer is None:
                raise ValueError(f"response {i} is text but the model {lm.source!r} has no tokenizer; pass token ids")
            ids = lm.tokenizer(r, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in np.asarray(r).reshape(-1) if int(t) >= 0]
        bad = [t for t in ids if t >= lm.vocab_size]
        if bad:
            raise ValueError(f"response {i} has token ids outside the vocabulary [0, {lm.vocab_size}): {bad[:5]}")
        resp_ids.append(ids)
    limit = lm.config.max_position_embeddings
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, resp_ids)]
    if max(lengths) > limit:
        i = int(np.argmax(lengths))
        raise ValueError(f"prompt {i} + its response is {lengths[i]} tokens, more than the model's context of {limit} "
                         "positions; shorten the response or score it with a longer-context model")
    n = len(prompt_ids)
    nll, counts = np.zeros(n, np.float64), np.array([len(r) for r in resp_ids], np.int64)
    order = np.argsort(lengths, kind="stable")  # batches of similar lengths
    mesh = lm.mesh
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=progress, unit="batch", dynamic_ncols=True)
    for s in starts:
        rows = order[s:s + batch_size]
        width = min(_bucket(max(lengths[i] for i in rows)), limit)
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for j, i in enumerate(rows):
            p, r = prompt_ids[i], resp_ids[i]
            tokens[j, :len(p) + len(r)] = p + r
            mask[j, len(p):len(p) + len(r)] = 1.0
        if mesh is None:
            out = _token_nll(lm.graphdef, lm.state, jnp.asarray(tokens), jnp.asarray(mask))
        else:
            with jax.set_mesh(mesh):
                args = (tokens, mask)
                if jax.process_count() > 1:
                    args = sharding.to_global(args, mesh)
                out = sharding.to_host(_token_nll(lm.graphdef, lm.state, *args))
        nll[rows] = np.asarray(out)[:len(rows)]
    return nll, counts
