"""What every causal LM family shares: the cached forward signature and the output head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rss_jax.cache import KVCache
from rss_jax.models.layers import default_positions


def normal_init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class CausalLM(nnx.Module):
    """Subclasses define `embed(tokens, positions)`, `layers_forward(h, positions, cache_k, cache_v, lengths)`,
    `final(h)` and `head_weight()` ([V, E] or [E, V] with `head_transposed`)."""

    config = None

    def __call__(self, tokens, positions=None, cache: KVCache | None = None, lengths=None, return_hidden=False):
        """tokens [B, T] int -> (logits [B, T, V] float32, cache).

        With a cache, the T tokens are written at slots lengths[b].. of each row and attend to everything before
        them; positions default to those slots. Without a cache it is the plain causal forward over tokens.
        With return_hidden=True the final hidden states [B, T, E] are returned instead of logits.
        """
        if positions is None:
            positions = default_positions(tokens, lengths)
        h = self.embed(tokens, positions)
        ck = cv = None
        if cache is not None:
            if lengths is None:
                raise ValueError("a cached forward needs `lengths` [B], the number of valid slots in each row")
            ck, cv = cache.k, cache.v
        h, ck, cv = self.layers_forward(h, positions, ck, cv, lengths)
        h = self.final(h)
        new_cache = KVCache(k=ck, v=cv) if cache is not None else None
        if return_hidden:
            return h, new_cache
        return self.unembed(h), new_cache

    def unembed(self, h):
        w = self.head_weight()
        if self.head_transposed:  # [E, V]
            return jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return jnp.einsum("bte,ve->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    head_transposed = False
