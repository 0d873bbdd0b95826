"""Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v biases) and SmolLM2, chosen by config flags.

RMSNorm, rotary positions, grouped-query attention (GQA; MQA and MHA are the cases KVH=1 and KVH=H), SwiGLU MLP,
tied or untied output head. Per-layer weights are stacked on a leading layer axis and run by one lax.scan.
Weights are stored [in, out]; Hugging Face's Linear [out, in] is transposed by the loader.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rss_jax.models.base import CausalLM, normal_init
from rss_jax.models.layers import (activation, apply_rope, attention, linear, params_of, rms_norm, rope_inv_freq,
                                   rope_tables, scan_layers)

# logical axes of every parameter (rss_jax.sharding maps them to mesh axes); per-layer weights lead with "layers"
LOGICAL_AXES = {
    "embed_tokens": ("vocab", "embed"), "lm_head": ("vocab", "embed"), "head_rows": (None, "embed"), "norm": (None,),
    "layers.attn_norm": ("layers", None), "layers.mlp_norm": ("layers", None),
    "layers.wq": ("layers", "embed", "heads"), "layers.wk": ("layers", "embed", "kv_heads"),
    "layers.wv": ("layers", "embed", "kv_heads"), "layers.bq": ("layers", "heads"),
    "layers.bk": ("layers", "kv_heads"), "layers.bv": ("layers", "kv_heads"), "layers.wo": ("layers", "heads", "embed"),
    "layers.w_gate": ("layers", "embed", "mlp"), "layers.w_up": ("layers", "embed", "mlp"),
    "layers.w_down": ("layers", "mlp", "embed"),
}

LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


class LlamaLayers(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, dtype):
        n, e, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = nnx.Param(jnp.ones((n, e), dtype))
        self.wq = nnx.Param(normal_init(rngs, (n, e, qd), dtype))
        self.wk = nnx.Param(normal_init(rngs, (n, e, kvd), dtype))
        self.wv = nnx.Param(normal_init(rngs, (n, e, kvd), dtype))
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((n, qd), dtype))
            self.bk = nnx.Param(jnp.zeros((n, kvd), dtype))
            self.bv = nnx.Param(jnp.zeros((n, kvd), dtype))
        self.wo = nnx.Param(normal_init(rngs, (n, qd, e), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((n, e), dtype))
        self.w_gate = nnx.Param(normal_init(rngs, (n, e, f), dtype))
        self.w_up = nnx.Param(normal_init(rngs, (n, e, f), dtype))
        self.w_down = nnx.Param(normal_init(rngs, (n, f, e), dtype))


class Llama(CausalLM):
    QUANT_LAYER_PARAMS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embed_tokens = nnx.Param(normal_init(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.layers = LlamaLayers(config, rngs, dtype)
        self.norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if not config.tie_word_embeddings and not config.head_token_ids:
            self.lm_head = nnx.Param(normal_init(rngs, (config.vocab_size, config.hidden_size), dtype))
        self.init_trimmed_head(config, rngs, dtype)

    def embed(self, tokens, positions):
        return self.lookup("embed_tokens", tokens)

    def layers_forward(self, h, positions, cache_k, cache_v, lengths, collect=False):
        cfg = self.config
        inv_freq = rope_inv_freq(cfg)
        act = activation(cfg.activation)
        b, t, _ = h.shape
        nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        tables = rope_tables(positions, inv_freq)  # once for all layers

        def block(p, h, ck, cv):
            with jax.named_scope("attention"):
                x = rms_norm(h, p["attn_norm"], cfg.norm_eps)
                q, k, v = linear(x, p, "wq"), linear(x, p, "wk"), linear(x, p, "wv")
                if "bq" in p:
                    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
                # q and k rotated together: one pass over the new tokens' heads
                qk = apply_rope(jnp.concatenate([q.reshape(b, t, nh, hd), k.reshape(b, t, kvh, hd)], 2), positions,
                                inv_freq, tables)
                q, k = qk[:, :, :nh], qk[:, :, nh:]
                v = v.reshape(b, t, kvh, hd)
                o, ck, cv = attention(q, k, v, ck, cv, lengths)
                h = h + linear(o, p, "wo")
            with jax.named_scope("mlp"):
                x = rms_norm(h, p["mlp_norm"], cfg.norm_eps)
                h = h + linear(act(linear(x, p, "w_gate")) * linear(x, p, "w_up"), p, "w_down")
            return h, ck, cv

        return scan_layers(block, self.layer_params(), h, cache_k, cache_v, collect)

    def stacked_layer_params(self) -> dict:
        return params_of(self.layers, LAYER_PARAMS)

    def final(self, h):
        return rms_norm(h, self.norm.value, self.config.norm_eps)

    def head_table_name(self):
        return "embed_tokens" if self.config.tie_word_embeddings else "lm_head"
