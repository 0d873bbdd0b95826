"""What every causal LM family shares: the cached forward signature and the output head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.cache import KVCache
from rss_jax.models.config import check_token_ids
from rss_jax.models.layers import default_positions


def normal_init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class CausalLM(nnx.Module):
    """Subclasses define `embed(tokens, positions)`, `layers_forward(h, positions, cache_k, cache_v, lengths)`,
    `final(h)` and `head_weight()` ([V, E] or [E, V] with `head_transposed`)."""

    config = None

    def __call__(self, tokens, positions=None, cache: KVCache | None = None, lengths=None, return_hidden=False,
                 taps: tuple = ()):
        """tokens [B, T] int -> (logits [B, T, V] float32, cache).

        With a cache, the T tokens are written at slots lengths[b].. of each row and attend to everything before
        them; positions default to those slots. Without a cache it is the plain causal forward over tokens.
        With return_hidden=True the final hidden states [B, T, E] are returned instead of logits.
        With `taps` (a static tuple of layer indices) a third output holds the residual stream after each of those
        layers, [B, T, len(taps), E], from the same forward (what a feature-draft head reads).
        """
        if positions is None:
            positions = default_positions(tokens, lengths)
        h = self.embed(tokens, positions)
        ck = cv = None
        if cache is not None:
            if lengths is None:
                raise ValueError("a cached forward needs `lengths` [B], the number of valid slots in each row")
            ck, cv = cache.k, cache.v
        if taps:
            h, ck, cv, hs = self.layers_forward(h, positions, ck, cv, lengths, collect=True)
            tapped = jnp.stack([hs[int(i)] for i in taps], axis=2)
        else:
            h, ck, cv = self.layers_forward(h, positions, ck, cv, lengths)
        h = self.final(h)
        new_cache = KVCache(k=ck, v=cv) if cache is not None else None
        out = h if return_hidden else self.unembed(h)
        return (out, new_cache, tapped) if taps else (out, new_cache)

    def token_embeddings(self):
        """The token embedding table [V, E] (what a feature-draft head embeds its input tokens with)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a token embedding table")

    def output_matrix(self):
        """The output head as [V, E] rows (tied or untied), for feature-draft heads that score with it."""
        w = self.head_weight()
        return w.T if self.head_transposed else w

    def init_trimmed_head(self, config, rngs: nnx.Rngs, dtype):
        """Subclasses call this last in __init__: a config with `head_token_ids` gets its own output rows
        `head_rows` [len(ids), E] (the tied or untied full head is then not used for logits)."""
        if config.head_token_ids:
            ids = check_token_ids(config.head_token_ids, config.vocab_size)
            self.head_rows = nnx.Param(normal_init(rngs, (len(ids), config.embed_dim), dtype))

    def unembed(self, h):
        ids = self.config.head_token_ids
        if ids:
            logits = jnp.einsum("bte,ve->btv", h, self.head_rows.value.astype(h.dtype),
                                preferred_element_type=jnp.float32)
            # scatter into the full vocabulary as a gather: slot len(ids) of the padded row holds -inf
            where = np.full((self.config.vocab_size,), len(ids), np.int32)
            where[np.asarray(ids)] = np.arange(len(ids), dtype=np.int32)
            padded = jnp.concatenate([logits, jnp.full(logits.shape[:-1] + (1,), -jnp.inf, jnp.float32)], -1)
            return jnp.take(padded, jnp.asarray(where), axis=-1)
        w = self.head_weight()
        if self.head_transposed:  # [E, V]
            return jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return jnp.einsum("bte,ve->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    head_transposed = False
