"""Feature-draft heads: EAGLE-style drafts that predict the next token from the target's own hidden states.

At head slot t the head reads the target's features at position t (the residual stream after a few chosen target
layers, each RMS-normed, fused by one linear map when there are several) and the embedding of token t+1, runs one
Llama-style decoder layer (or `depth` of them) with its own KV cache, and scores a draft vocabulary D (a sorted list
of token ids) with the target's own output rows W[D]: logits for token t+2. For drafting steps 2..K no target
feature exists yet, so the head feeds back its own output hidden state in place of the fused feature.

The head owns no vocabulary weights: the token embedding table and the output rows are the target's, passed in at
call time (`embed_table` [V, E], `out_rows` = W[D] [|D|, E], gathered once per decode call, not per step).
A head names the target it belongs to (`HeadConfig.check_target`) and refuses another one.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.models.base import head_product, normal_init
from rss_jax.models.config import ConfigError, _freeze, check_token_ids
from rss_jax.kernels import int8_matmul, quantize_param
from rss_jax.models.layers import activation, apply_rope, attention, default_positions, rms_norm, rope_inv_freq

# the target fields a head is tied to: the ones that decide what its features and vocabulary mean
TARGET_FIELDS = ("family", "hidden_size", "num_layers", "vocab_size")


class HeadTargetMismatch(ConfigError):
    """A feature-draft head was used with a target it was not made for."""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Frozen and hashable (it sits in the NNX graphdef). `taps`: target layer indices whose output the head reads;
    `token_ids`: the draft vocabulary (strictly increasing ids of the target's vocabulary)."""
    target_family: str
    target_model_type: str
    target_hidden_size: int
    target_num_layers: int
    target_vocab_size: int
    taps: tuple
    token_ids: tuple
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    activation: str = "silu"
    kind: str = "feature_head"
    depth: int = 1  # decoder layers of the head itself (layer 0's weights keep the one-layer names)

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)) or self.depth < 1:
            raise ValueError(f"a feature-draft head's depth is a number of decoder layers >= 1, got {self.depth!r}")
        object.__setattr__(self, "depth", int(self.depth))

    # what the decoding engine and the KV cache read from any model config
    @property
    def hidden_size(self) -> int:
        return self.target_hidden_size

    @property
    def vocab_size(self) -> int:
        return self.target_vocab_size

    @property
    def num_layers(self) -> int:  # the head's own KV cache: one layer per decoder layer of the head
        return self.depth

    @property
    def head_token_ids(self) -> tuple:
        return self.token_ids

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def target(self) -> dict:
        return {"family": self.target_family, "model_type": self.target_model_type,
                "hidden_size": self.target_hidden_size, "num_layers": self.target_num_layers,
                "vocab_size": self.target_vocab_size}

    def check_target(self, config, what: str = "the target") -> None:
        """Raise HeadTargetMismatch naming the first field where `config` (a ModelConfig) differs from the
        target this head was made for."""
        if getattr(config, "kind", None) == "feature_head":
            raise HeadTargetMismatch(f"{what} is itself a feature-draft head; a head drafts for a full model")
        mine = self.target
        for field in TARGET_FIELDS:
            theirs = getattr(config, field)
            if theirs != mine[field]:
                raise HeadTargetMismatch(
                    f"this feature-draft head was made for a target with {field}={mine[field]!r} "
                    f"({_describe(mine)}), but {what} has {field}={theirs!r}; use a head trained for this target "
                    "(training.heads) or load the target it belongs to")
        if config.head_token_ids:
            raise HeadTargetMismatch(f"{what} has a trimmed output head; a feature-draft head scores with the "
                                     "target's full output matrix")
        if config.embed_dim != config.hidden_size:
            raise HeadTargetMismatch(f"{what} has token embeddings of width {config.embed_dim} != hidden size "
                                     f"{config.hidden_size} (OPT project_in/out); feature heads need them equal")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["taps"] = list(self.taps)
        d["token_ids"] = list(self.token_ids)
        d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "HeadConfig":
        d = dict(d)
        d["taps"] = tuple(int(i) for i in d["taps"])
        d["token_ids"] = tuple(int(i) for i in d["token_ids"])
        d["rope_scaling"] = _freeze(d.get("rope_scaling") or {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def for_target(cls, config, taps, token_ids, depth: int = 1) -> "HeadConfig":
        """A head whose `depth` decoder layers are shaped like a layer of a Llama-family target (attention and MLP
        widths, RoPE); for GPT-2 and OPT targets the head's layers are Llama-style with the target's widths."""
        taps = tuple(int(t) for t in taps)
        if not taps:
            raise ValueError("a feature-draft head needs at least one tapped target layer")
        bad = [t for t in taps if not 0 <= t < config.num_layers]
        if bad or len(set(taps)) != len(taps):
            raise ValueError(f"taps {list(taps)} must be distinct layer indices in 0..{config.num_layers - 1}")
        ids = check_token_ids(sorted(int(i) for i in token_ids), config.vocab_size, "token_ids")
        llama = config.family == "llama"
        return cls(target_family=config.family, target_model_type=config.model_type,
                   target_hidden_size=config.hidden_size, target_num_layers=config.num_layers,
                   target_vocab_size=config.vocab_size, taps=taps, token_ids=tuple(int(i) for i in ids),
                   num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                   intermediate_size=config.intermediate_size,
                   max_position_embeddings=config.max_position_embeddings,
                   norm_eps=config.norm_eps if llama else 1e-5, rope_theta=config.rope_theta if llama else 10000.0,
                   rope_scaling=config.rope_scaling if llama else (),
                   activation="silu", depth=depth)


def _describe(target: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in target.items())


# the weights of one decoder layer; layer 0's sit on the head itself, layer l >= 1's on `head.block<l>`
LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _layer_params(owner, config: HeadConfig, rngs: nnx.Rngs, dtype) -> None:
    e, f = config.hidden_size, config.intermediate_size
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    owner.attn_norm = nnx.Param(jnp.ones((e,), dtype))
    owner.wq = nnx.Param(normal_init(rngs, (e, qd), dtype))
    owner.wk = nnx.Param(normal_init(rngs, (e, kvd), dtype))
    owner.wv = nnx.Param(normal_init(rngs, (e, kvd), dtype))
    owner.wo = nnx.Param(normal_init(rngs, (qd, e), dtype))
    owner.mlp_norm = nnx.Param(jnp.ones((e,), dtype))
    owner.w_gate = nnx.Param(normal_init(rngs, (e, f), dtype))
    owner.w_up = nnx.Param(normal_init(rngs, (e, f), dtype))
    owner.w_down = nnx.Param(normal_init(rngs, (f, e), dtype))


def _lin(owner, x, name, cast: bool = False):
    """x [..., in] times the matrix `name` of `owner` (float [in, out], or int8 [out, in] with its scales). A float
    matrix promotes with x as einsum does, or with `cast` is first cast to x's dtype (the tap fusion's convention)."""
    w, scale = getattr(owner, name).value, getattr(owner, name + "_scale", None)
    if scale is None:
        return jnp.einsum("...f,fe->...e", x, w.astype(x.dtype) if cast else w)
    return int8_matmul(x, w, scale.value)


class HeadBlock(nnx.Module):
    """Decoder layer l >= 1 of a deeper head (the same weights as layer 0, which lives on the head itself)."""

    def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        _layer_params(self, config, rngs, dtype)


class FeatureHead(nnx.Module):
    """`depth` decoder layers over fused target features and next-token embeddings (see the module docstring)."""

    def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        e, n = config.hidden_size, len(config.taps)
        self.tap_norm = nnx.Param(jnp.ones((n, e), dtype))
        if n > 1:
            self.fuse_w = nnx.Param(normal_init(rngs, (n * e, e), dtype))
        self.embed_norm = nnx.Param(jnp.ones((e,), dtype))
        self.feat_norm = nnx.Param(jnp.ones((e,), dtype))
        self.in_proj = nnx.Param(normal_init(rngs, (2 * e, e), dtype))
        _layer_params(self, config, rngs, dtype)
        for layer in range(1, config.depth):
            setattr(self, f"block{layer}", HeadBlock(config, rngs=rngs, dtype=dtype))
        self.out_norm = nnx.Param(jnp.ones((e,), dtype))

    # the [in, out] matrices that int8 quantisation stores as int8 [out, in] with grouped scales `<name>_scale`
    QUANT_PARAMS = ("fuse_w", "in_proj") + LAYER_MATRICES

    @property
    def is_int8(self) -> bool:
        """Whether `quantize_int8` made this head's matrices int8 (a decode loop then scores it with int8 rows W[D]
        too, `kernels.quantize_rows` of the target's output rows)."""
        return getattr(self, "in_proj_scale", None) is not None

    def layer(self, index: int):
        """The module holding decoder layer `index`'s weights (the head itself for layer 0)."""
        return self if index == 0 else getattr(self, f"block{index}")

    def _lin(self, x, name, cast: bool = False):
        return _lin(self, x, name, cast)

    def quantize_int8(self) -> None:
        """The head's matrices as int8 with one scale per group of 32 input weights (`kernels.quantize_rows`), in
        place; norms stay in the head's dtype. For decoding only: training needs the float head."""
        for name in self.QUANT_PARAMS:
            quantize_param(self, name, transpose=True)
        for index in range(1, self.config.depth):
            for name in LAYER_MATRICES:
                quantize_param(self.layer(index), name, transpose=True)

    def fuse(self, taps):
        """Target features [B, T, n_taps, E] -> the head's input feature [B, T, E]: each tap RMS-normed, then one
        linear map over their concatenation (none for a single tap)."""
        cfg = self.config
        normed = rms_norm(taps, self.tap_norm.value, cfg.norm_eps)
        b, t, n, e = normed.shape
        if n == 1:
            return normed[:, :, 0]
        return self._lin(normed.reshape(b, t, n * e), "fuse_w", cast=True)

    def __call__(self, feat, tokens, embed_table, out_rows=None, cache=None, lengths=None, positions=None):
        """feat [B, T, E] (fused target features, or the head's own fed-back outputs), tokens [B, T] (token t+1
        beside feature t) -> (logits over the draft vocabulary [B, T, |D|] float32, or None without `out_rows`;
        output hidden states [B, T, E] (what is fed back); the updated KVCache or None).

        With a cache (a KVCache with one layer per decoder layer) the T slots are written at lengths[b].. as in the
        target's forward."""
        if positions is None:
            positions = default_positions(tokens, lengths)
        h = self.inputs(feat, tokens, embed_table)
        ks, vs = [], []
        for index in range(self.config.depth):
            q, k, v = self.qkv(h, positions, index)
            if cache is not None:
                o, ck, cv = attention(q, k, v, cache.k[index], cache.v[index], lengths)
                ks.append(ck)
                vs.append(cv)
            else:
                o, _, _ = attention(q, k, v)
            h = self.finish(h, o, index)
        if cache is not None:
            cache = type(cache)(k=jnp.stack(ks), v=jnp.stack(vs))
        logits = self.logits(h, out_rows) if out_rows is not None else None
        return logits, h, cache

    # the forward in parts, so that training can run its own attention pattern (training-time test)
    def inputs(self, feat, tokens, embed_table):
        """[B, T, E] feature + token ids -> the first decoder layer's input residual stream [B, T, E]."""
        eps = self.config.norm_eps
        emb = jnp.take(embed_table, tokens, axis=0).astype(feat.dtype)
        x = jnp.concatenate([rms_norm(emb, self.embed_norm.value, eps), rms_norm(feat, self.feat_norm.value, eps)],
                            axis=-1)
        return self._lin(x, "in_proj")

    def qkv(self, h, positions, index: int = 0):
        """Decoder layer `index`: -> q [B, T, H, D], k and v [B, T, KVH, D] (rotary positions applied)."""
        cfg, w = self.config, self.layer(index)
        b, t, _ = h.shape
        inv_freq = rope_inv_freq(cfg)
        y = rms_norm(h, w.attn_norm.value, cfg.norm_eps)
        q = _lin(w, y, "wq").reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = _lin(w, y, "wk").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = _lin(w, y, "wv").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def finish(self, h, o, index: int = 0):
        """Decoder layer `index`: residual stream [B, T, E] + attention output [B, T, H*D] -> its output."""
        cfg, w = self.config, self.layer(index)
        h = h + _lin(w, o, "wo")
        y = rms_norm(h, w.mlp_norm.value, cfg.norm_eps)
        act = activation(cfg.activation)
        return h + _lin(w, act(_lin(w, y, "w_gate")) * _lin(w, y, "w_up"), "w_down")

    def logits(self, h, out_rows):
        """Output hidden states [B, T, E] -> logits over the draft vocabulary [B, T, |D|] float32."""
        return head_product(self, self.normed(h), out_rows)

    def normed(self, h):
        """Output hidden states [B, T, E] -> what the output rows score (the output norm applied); two heads over
        the same rows can then be scored in one product (the decode loop does that for SSS and EFT)."""
        return rms_norm(h, self.out_norm.value, self.config.norm_eps)


def full_vocab(logits_d, token_ids: tuple, vocab: int):
    """Scatter draft-vocabulary logits [..., |D|] into the full vocabulary [..., vocab]: -inf outside D (a gather
    from a row padded with one -inf slot, which XLA does faster than a scatter)."""
    where = np.full((vocab,), len(token_ids), np.int32)
    where[np.asarray(token_ids)] = np.arange(len(token_ids), dtype=np.int32)
    padded = jnp.concatenate([logits_d, jnp.full(logits_d.shape[:-1] + (1,), -jnp.inf, logits_d.dtype)], -1)
    return jnp.take(padded, jnp.asarray(where), axis=-1)


def init_head(config: HeadConfig, seed: int = 0, dtype=jnp.float32) -> FeatureHead:
    return FeatureHead(config, rngs=nnx.Rngs(seed), dtype=dtype)


def abstract_head(config: HeadConfig, dtype=jnp.float32) -> FeatureHead:
    return nnx.eval_shape(lambda: init_head(config, 0, dtype))


def num_params(config: HeadConfig) -> int:
    state = nnx.state(abstract_head(config), nnx.Param)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
