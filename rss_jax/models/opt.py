"""OPT: learned positions with an offset of 2, LayerNorm before (or, for OPT-350m, after) each sub-layer, ReLU MLP,
q/k/v/out projections with biases, and for OPT-350m a `project_in`/`project_out` pair between the 512-wide
embedding and the 1024-wide decoder. The output head is tied to the token embedding."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rss_jax.models.base import CausalLM, normal_init
from rss_jax.models.layers import activation, attention, layer_norm, linear, params_of, scan_layers

# logical axes of every parameter (rss_jax.sharding maps them to mesh axes)
LOGICAL_AXES = {
    "embed_tokens": ("vocab", "embed"), "embed_positions": (None, "embed"), "head_rows": (None, "embed"),
    "project_in": (None, "embed"), "project_out": ("embed", None), "final_ln_w": (None,), "final_ln_b": (None,),
    "layers.attn_ln_w": ("layers", None), "layers.attn_ln_b": ("layers", None), "layers.mlp_ln_w": ("layers", None),
    "layers.mlp_ln_b": ("layers", None), "layers.wq": ("layers", "embed", "heads"), "layers.bq": ("layers", "heads"),
    "layers.wk": ("layers", "embed", "kv_heads"), "layers.bk": ("layers", "kv_heads"),
    "layers.wv": ("layers", "embed", "kv_heads"), "layers.bv": ("layers", "kv_heads"),
    "layers.wo": ("layers", "heads", "embed"), "layers.bo": ("layers", None),
    "layers.w_fc1": ("layers", "embed", "mlp"), "layers.b_fc1": ("layers", "mlp"),
    "layers.w_fc2": ("layers", "mlp", "embed"), "layers.b_fc2": ("layers", None),
}

LAYER_PARAMS = ("attn_ln_w", "attn_ln_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "mlp_ln_w", "mlp_ln_b",
                "w_fc1", "b_fc1", "w_fc2", "b_fc2")


class OPTLayers(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, dtype):
        n, e, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        for name in ("attn_ln", "mlp_ln"):
            setattr(self, name + "_w", nnx.Param(jnp.ones((n, e), dtype)))
            setattr(self, name + "_b", nnx.Param(jnp.zeros((n, e), dtype)))
        for name in ("q", "k", "v", "o"):
            setattr(self, "w" + name, nnx.Param(normal_init(rngs, (n, e, e), dtype)))
            setattr(self, "b" + name, nnx.Param(jnp.zeros((n, e), dtype)))
        self.w_fc1 = nnx.Param(normal_init(rngs, (n, e, f), dtype))
        self.b_fc1 = nnx.Param(jnp.zeros((n, f), dtype))
        self.w_fc2 = nnx.Param(normal_init(rngs, (n, f, e), dtype))
        self.b_fc2 = nnx.Param(jnp.zeros((n, e), dtype))


class OPT(CausalLM):
    QUANT_LAYER_PARAMS = ("wq", "wk", "wv", "wo", "w_fc1", "w_fc2")

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        e, w = config.hidden_size, config.embed_dim
        self.embed_tokens = nnx.Param(normal_init(rngs, (config.vocab_size, w), dtype))
        self.embed_positions = nnx.Param(
            normal_init(rngs, (config.max_position_embeddings + config.position_offset, e), dtype))
        if config.word_embed_proj_dim:
            self.project_in = nnx.Param(normal_init(rngs, (w, e), dtype))
            self.project_out = nnx.Param(normal_init(rngs, (e, w), dtype))
        self.layers = OPTLayers(config, rngs, dtype)
        if config.final_layer_norm:
            self.final_ln_w = nnx.Param(jnp.ones((e,), dtype))
            self.final_ln_b = nnx.Param(jnp.zeros((e,), dtype))
        self.init_trimmed_head(config, rngs, dtype)

    def embed(self, tokens, positions):
        h = self.lookup("embed_tokens", tokens)
        if self.config.word_embed_proj_dim:
            h = jnp.einsum("btw,we->bte", h, self.project_in.value)
        pos = jnp.take(self.embed_positions.value, positions + self.config.position_offset, axis=0)
        return h + pos

    def layers_forward(self, h, positions, cache_k, cache_v, lengths, collect=False):
        cfg = self.config
        act = activation(cfg.activation)
        b, t, e = h.shape
        nh, hd = cfg.num_heads, cfg.head_dim
        eps, pre = cfg.norm_eps, cfg.do_layer_norm_before

        def block(p, h, ck, cv):
            x = layer_norm(h, p["attn_ln_w"], p["attn_ln_b"], eps) if pre else h
            q, k, v = (
                (linear(x, p, "w" + n) + p["b" + n]).reshape(b, t, nh, hd) for n in "qkv")
            o, ck, cv = attention(q, k, v, ck, cv, lengths)
            h = h + linear(o, p, "wo") + p["bo"]
            if not pre:
                h = layer_norm(h, p["attn_ln_w"], p["attn_ln_b"], eps)
            x = layer_norm(h, p["mlp_ln_w"], p["mlp_ln_b"], eps) if pre else h
            x = act(linear(x, p, "w_fc1") + p["b_fc1"])
            h = h + linear(x, p, "w_fc2") + p["b_fc2"]
            if not pre:
                h = layer_norm(h, p["mlp_ln_w"], p["mlp_ln_b"], eps)
            return h, ck, cv

        return scan_layers(block, self.layer_params(), h, cache_k, cache_v, collect)

    def stacked_layer_params(self) -> dict:
        return params_of(self.layers, LAYER_PARAMS)

    def final(self, h):
        if self.config.final_layer_norm:
            h = layer_norm(h, self.final_ln_w.value, self.final_ln_b.value, self.config.norm_eps)
        if self.config.word_embed_proj_dim:
            h = jnp.einsum("bte,ew->btw", h, self.project_out.value)
        return h

