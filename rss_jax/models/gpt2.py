"""GPT-2: learned absolute positions, pre-LayerNorm, fused q/k/v (Conv1D layout, already [in, out]), GELU (tanh)
MLP, output head tied to the token embedding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rss_jax.models.base import CausalLM, normal_init
from rss_jax.models.layers import activation, attention, layer_norm, linear, params_of, scan_layers

# logical axes of every parameter (rss_jax.sharding maps them to mesh axes); the fused QKV output is split over
# "heads" as one dimension (q, k and v columns each divide evenly when the heads do)
LOGICAL_AXES = {
    "wte": ("vocab", "embed"), "wpe": (None, "embed"), "lm_head": ("vocab", "embed"), "head_rows": (None, "embed"),
    "ln_f_w": (None,), "ln_f_b": (None,),
    "layers.ln1_w": ("layers", None), "layers.ln1_b": ("layers", None), "layers.ln2_w": ("layers", None),
    "layers.ln2_b": ("layers", None), "layers.w_qkv": ("layers", "embed", "heads"), "layers.b_qkv": ("layers", "heads"),
    "layers.w_o": ("layers", "heads", "embed"), "layers.b_o": ("layers", None),
    "layers.w_fc": ("layers", "embed", "mlp"), "layers.b_fc": ("layers", "mlp"),
    "layers.w_proj": ("layers", "mlp", "embed"), "layers.b_proj": ("layers", None),
}

LAYER_PARAMS = ("ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_w", "ln2_b", "w_fc", "b_fc", "w_proj",
                "b_proj")


class GPT2Layers(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, dtype):
        n, e, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        self.ln1_w = nnx.Param(jnp.ones((n, e), dtype))
        self.ln1_b = nnx.Param(jnp.zeros((n, e), dtype))
        self.w_qkv = nnx.Param(normal_init(rngs, (n, e, 3 * e), dtype))
        self.b_qkv = nnx.Param(jnp.zeros((n, 3 * e), dtype))
        self.w_o = nnx.Param(normal_init(rngs, (n, e, e), dtype))
        self.b_o = nnx.Param(jnp.zeros((n, e), dtype))
        self.ln2_w = nnx.Param(jnp.ones((n, e), dtype))
        self.ln2_b = nnx.Param(jnp.zeros((n, e), dtype))
        self.w_fc = nnx.Param(normal_init(rngs, (n, e, f), dtype))
        self.b_fc = nnx.Param(jnp.zeros((n, f), dtype))
        self.w_proj = nnx.Param(normal_init(rngs, (n, f, e), dtype))
        self.b_proj = nnx.Param(jnp.zeros((n, e), dtype))


class GPT2(CausalLM):
    QUANT_LAYER_PARAMS = ("w_qkv", "w_o", "w_fc", "w_proj")
    EMBED_TABLE = "wte"

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.wte = nnx.Param(normal_init(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.wpe = nnx.Param(normal_init(rngs, (config.max_position_embeddings, config.hidden_size), dtype))
        self.layers = GPT2Layers(config, rngs, dtype)
        self.ln_f_w = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.ln_f_b = nnx.Param(jnp.zeros((config.hidden_size,), dtype))
        self.init_trimmed_head(config, rngs, dtype)

    def embed(self, tokens, positions):
        return self.lookup("wte", tokens) + jnp.take(self.wpe.value, positions, axis=0)

    def layers_forward(self, h, positions, cache_k, cache_v, lengths, collect=False):
        cfg = self.config
        act = activation(cfg.activation)
        b, t, e = h.shape
        nh, hd = cfg.num_heads, cfg.head_dim
        eps = cfg.norm_eps

        def block(p, h, ck, cv):
            x = layer_norm(h, p["ln1_w"], p["ln1_b"], eps)
            qkv = linear(x, p, "w_qkv") + p["b_qkv"]
            q, k, v = (a.reshape(b, t, nh, hd) for a in jnp.split(qkv, 3, axis=-1))
            o, ck, cv = attention(q, k, v, ck, cv, lengths)
            h = h + linear(o, p, "w_o") + p["b_o"]
            x = layer_norm(h, p["ln2_w"], p["ln2_b"], eps)
            x = act(linear(x, p, "w_fc") + p["b_fc"])
            h = h + linear(x, p, "w_proj") + p["b_proj"]
            return h, ck, cv

        return scan_layers(block, self.layer_params(), h, cache_k, cache_v, collect)

    def stacked_layer_params(self) -> dict:
        return params_of(self.layers, LAYER_PARAMS)

    def final(self, h):
        return layer_norm(h, self.ln_f_w.value, self.ln_f_b.value, self.config.norm_eps)

