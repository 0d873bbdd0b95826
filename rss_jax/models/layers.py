"""Building blocks shared by the model families: norms, rotary embeddings, attention with or without a KV cache.

All math that decides probabilities (norm statistics, softmax) runs in float32 whatever the weight dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rss_jax.cache import DeferredWrite, LayerSlot, write_block, write_layers


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, weight, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation function {name!r} (supported: silu, gelu, gelu_new, relu)")


def rope_inv_freq(config) -> jax.Array:
    """Inverse frequencies [D/2] including `linear` and `llama3` scaling (as Hugging Face computes them)."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_tables(positions, inv_freq):
    """(cos, sin) [B, T, 1, D/2] of positions [B, T]: computed once per forward and shared by every layer."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, positions, inv_freq, tables=None):
    """Rotate x [B, T, H, D] by positions [B, T] (half-split layout, as in Hugging Face Llama); `tables` are
    `rope_tables(positions, inv_freq)` when the caller has them already."""
    cos, sin = rope_tables(positions, inv_freq) if tables is None else tables
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q, k, v, cache_k=None, cache_v=None, lengths=None):
    """Grouped-query attention.

    q [B, T, H, D], k/v [B, T, KVH, D] for the T new tokens.
    Without a cache: causal attention of the T tokens among themselves.
    With a cache (one layer's [B, S, KVH, D], or a `LayerSlot` of the stacked cache, which is then what comes
    back): the new k/v are written at slots lengths[b]..lengths[b]+T-1 and query
    t of row b sees slots 0..lengths[b]+t.
    Returns (out [B, T, H*D], cache_k, cache_v).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    short = t <= FUSED_ATTENTION_MAX_T and jax.default_backend() == "cpu"
    if isinstance(cache_k, LayerSlot):  # the unrolled layer loop: the stacked cache comes back, updated in place
        i = cache_k.index
        from rss_jax.kernels import attention_kernel_available, cached_attention
        if short and (t == 1 or attention_kernel_available(cache_k.stacked.dtype)):
            # a decode step or a block: this layer's slots are read before the write, and the new tokens are
            # attended to from k and v themselves: a read of the written buffer made XLA on CPU copy the whole
            # stacked cache at every layer (the writes wait for `scan_layers` to do them after the last layer).
            # Blocks of several tokens take this path only through the kernel: its XLA form made XLA's compile of
            # the speculative loops 7x slower, so without the kernel they write first and read the layer back.
            out = cached_attention(q.reshape(b, t, kvh, h // kvh, d), cache_k.stacked, cache_v.stacked, i, k, v,
                                   lengths)
            return (out.reshape(b, t, h * d).astype(q.dtype), cache_k.defer(k, lengths),
                    cache_v.defer(v, lengths))
        cache_k, cache_v = cache_k.write(k, lengths), cache_v.write(v, lengths)
        keys, values = cache_k[i], cache_v[i]
    elif cache_k is not None:
        cache_k = write_block(cache_k, k, lengths)
        cache_v = write_block(cache_v, v, lengths)
        keys, values = cache_k, cache_v
    if cache_k is not None:
        q_slot = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    else:
        keys, values = k, v
        q_slot = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    s = keys.shape[1]
    mask = jnp.arange(s)[None, None, :] <= q_slot[:, :, None]  # [B, T, S]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    if cache_k is not None and short:
        out = _fused_short_attention(qg, keys, values, mask)
        return out.reshape(b, t, h * d).astype(q.dtype), cache_k, cache_v
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(values.dtype), values)
    return out.reshape(b, t, h * d).astype(q.dtype), cache_k, cache_v


# cached forwards of at most this many new tokens (decode steps, draft blocks, verification blocks) take the fused
# path on the CPU backend
FUSED_ATTENTION_MAX_T = 16


# up to this many KV heads, the few-token path runs its products as plain matrix products over all KV heads at once
# (`_head_scores`); above it, as broadcast products
BLOCK_PRODUCT_MAX_KV_HEADS = 4


def _head_scores(qf, keys):
    """q . k for every (KV head, group) of qf [B, T, KVH, G, D] float32 against keys [B, S, KVH, D] -> [B, T, KVH, G,
    S] float32, in the cache's own layout. With at most BLOCK_PRODUCT_MAX_KV_HEADS KV heads, each query is laid out
    over all KV heads' dimensions with zeros outside its own head, so that one [B, T*H, KVH*D] x [B, S, KVH*D]
    product gives every score (KVH-fold the multiplications, no copy of the cache); XLA on CPU runs that as one
    matrix product, where the broadcast product reduced over D (the form above the limit) is split into windows of
    32 that are written out between the steps (`scripts/bench_matmul.py --attention` times both). Batched products over (B, KVH), the other obvious spelling, made XLA
    transpose the whole cache into batch-major order at every step."""
    b, t, kvh, g, d = qf.shape
    s = keys.shape[1]
    if kvh > BLOCK_PRODUCT_MAX_KV_HEADS:
        return jnp.moveaxis(jnp.sum(qf[:, :, None] * keys.astype(jnp.float32)[:, None, :, :, None, :], axis=-1), 2, -1)
    eye = jnp.eye(kvh, dtype=jnp.float32)
    qx = (qf[:, :, :, :, None, :] * eye[None, None, :, None, :, None]).reshape(b, t * kvh * g, kvh * d)
    scores = jnp.einsum("bmc,bsc->bms", qx, keys.reshape(b, s, kvh * d).astype(jnp.float32))
    return scores.reshape(b, t, kvh, g, s)


def _head_mix(probs, values):
    """sum_s probs[b, t, k, g, s] * values[b, s, k, :] -> [B, T, KVH, G, D] float32 (the weighted values of each
    query head from its own KV head); the same block layout as `_head_scores`: one product against all KV heads'
    values, then each head's own block is kept."""
    b, t, kvh, g, s = probs.shape
    d = values.shape[-1]
    vf = values.astype(jnp.float32)
    if kvh > BLOCK_PRODUCT_MAX_KV_HEADS:
        return jnp.sum(jnp.moveaxis(probs, -1, 2)[..., None] * vf[:, None, :, :, None, :], axis=2)
    out = jnp.einsum("bms,bsc->bmc", probs.reshape(b, t * kvh * g, s), vf.reshape(b, s, kvh * d))
    out = out.reshape(b, t, kvh, g, kvh, d)
    return jnp.einsum("btkgjd,kj->btkgd", out, jnp.eye(kvh, dtype=jnp.float32))


def _fused_short_attention(qg, keys, values, mask):
    """Attention of a few new tokens over a cache in its own layout [B, S, KVH, D], without reordering the cache
    (`_head_scores`, `_head_mix`). The einsums of the general path are batched products over (B, KVH), which XLA on
    CPU runs only after transposing the keys and the values of the whole cache into batch-major order at every
    step: at batch 64 with 400 slots that was three quarters of a decode step. The same sums in float32, so the same
    law. qg [B, T, KVH, G, D], keys/values [B, S, KVH, D], mask [B, T, S] -> [B, T, KVH, G, D]."""
    d = qg.shape[-1]
    scores = _head_scores(qg.astype(jnp.float32), keys) / math.sqrt(d)
    scores = jnp.where(mask[:, :, None, None, :], scores, -1e30)  # [B, T, KVH, G, S]
    return _head_mix(jax.nn.softmax(scores, axis=-1), values)


def split_attention(qg, old_k, old_v, k, v, lengths):
    """The same law as `_fused_short_attention` over a cache updated with the new tokens, computed from the cache
    as it was before the write (slots < lengths[b]) and the T new keys and values themselves (causal among the new
    tokens), with one softmax over both parts. qg [B, T, KVH, G, D], old_k/old_v [B, S, KVH, D], k/v [B, T, KVH, D],
    lengths [B] -> [B, T, KVH, G, D]."""
    t, d = qg.shape[1], qg.shape[-1]
    s = old_k.shape[1]
    qf = qg.astype(jnp.float32) / math.sqrt(d)
    old = _head_scores(qf, old_k)  # [B, T, KVH, G, S]
    old = jnp.where((jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, None, :], old, -1e30)
    new = _head_scores(qf, k)  # [B, T, KVH, G, T']
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, T']
    new = jnp.where(causal[None, :, None, None, :], new, -1e30)
    # one softmax over both parts, without joining them: a shared maximum, then each part's weights and sums
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), jnp.max(new, axis=-1, keepdims=True))
    e_old, e_new = jnp.exp(old - top), jnp.exp(new - top)
    total = jnp.sum(e_old, axis=-1) + jnp.sum(e_new, axis=-1)  # [B, T, KVH, G]
    return (_head_mix(e_old, old_v) + _head_mix(e_new, v)) / total[..., None]


def scan_layers(block, layer_params, h, cache_k=None, cache_v=None, collect: bool = False):
    """Run `block(params_l, h, ck_l, cv_l) -> (h, ck_l, cv_l)` over the layers. cache_k/cache_v are
    [L, B, S, KVH, D] or None (uncached forward).

    `layer_params` is either a dict of stacked [L, ...] arrays, run by one lax.scan (compile time does not grow with
    depth), or a list of per-layer dicts made outside any decode loop (`base.decode_model`), run by an unrolled
    Python loop. The second form exists for the CPU backend: there a scan slices each layer's weights out of the
    stacked arrays into fresh buffers at every step, which reads and writes every weight once more per decoded
    token. In the list the matrices are `kernels.LayerWeight`s that the CPU kernels read in place (or, without the
    kernels, per-layer buffers sliced once per call). With a cache, a layer whose attention took the few-token path
    hands back a `cache.DeferredWrite`, and all of them are written here after the last layer, in one scatter.
    Returns (h, cache_k, cache_v), plus with `collect` every layer's output residual stream [L, B, T, E] (the
    taps a feature draft reads; the same forward, no second pass)."""
    if isinstance(layer_params, (list, tuple)):
        outs, writes_k, writes_v = [], [], []
        for i, p in enumerate(layer_params):
            if cache_k is None:
                h, _, _ = block(p, h, None, None)
            else:
                h, ck, cv = block(p, h, LayerSlot(cache_k, i), LayerSlot(cache_v, i))
                if isinstance(ck, DeferredWrite):
                    writes_k.append(ck)
                    writes_v.append(cv)
                else:
                    cache_k, cache_v = ck, cv
            if collect:
                outs.append(h)
        if writes_k:
            # the new keys and values take a zero computed from the last layer's output, which needs every layer's
            # read of the cache: with that data dependency XLA can prove the reads done before the in-place write
            # (without it, once the reads feed matrix products, XLA copied the whole stacked cache twice per step;
            # an optimization_barrier did not order them). nan_to_num keeps the zero a zero whatever h holds.
            zero = jnp.zeros((), jnp.float32) * jnp.nan_to_num(h.reshape(-1)[0].astype(jnp.float32))
            writes_k = [DeferredWrite(w.index, w.new + zero.astype(w.new.dtype), w.lengths) for w in writes_k]
            writes_v = [DeferredWrite(w.index, w.new + zero.astype(w.new.dtype), w.lengths) for w in writes_v]
            cache_k, cache_v = write_layers(cache_k, writes_k), write_layers(cache_v, writes_v)
        hs = jnp.stack(outs) if collect else None
        return (h, cache_k, cache_v, hs) if collect else (h, cache_k, cache_v)

    if cache_k is None:
        def body(h, p):
            h, _, _ = block(p, h, None, None)
            return h, (h if collect else None)
        h, hs = jax.lax.scan(body, h, layer_params)
        return (h, None, None, hs) if collect else (h, None, None)

    # the cache travels as scanned input and output: each layer reads and writes only its own slice
    def body(h, xs):
        p, ck, cv = xs
        h, ck, cv = block(p, h, ck, cv)
        return h, (ck, cv, h if collect else None)

    h, (cache_k, cache_v, hs) = jax.lax.scan(body, h, (layer_params, cache_k, cache_v))
    return (h, cache_k, cache_v, hs) if collect else (h, cache_k, cache_v)


def default_positions(tokens, lengths):
    t = tokens.shape[1]
    if lengths is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], tokens.shape)
    return lengths[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]


def params_of(module, names) -> dict:
    """The raw arrays of a stacked-layer module's Params, by name (skipping ones the config left out); an int8
    weight brings its grouped scales as `<name>_scale`."""
    out = {}
    for n in names:
        for key in (n, n + "_scale"):
            p = getattr(module, key, None)
            if p is not None:
                out[key] = p.value
    return out


def linear(x, p: dict, name: str):
    """x [..., in] times the layer weight `name` of `p`: a float [in, out] matrix, or (after int8 quantisation) an
    int8 [out, in] matrix with float scales `<name>_scale` [out, in / 32] (`kernels.quantize_rows`), or, in a
    decode loop, a `kernels.LayerWeight` that the CPU kernels read in place from the stacked weights."""
    from rss_jax.kernels import LayerWeight, dense_matmul, int8_matmul
    w = p[name]
    if isinstance(w, LayerWeight):
        if w.scale is not None:
            return int8_matmul(x, w.stacked, w.scale, layer=w.index)
        return dense_matmul(x, w.stacked, layer=w.index)
    scale = p.get(name + "_scale")
    if scale is None:
        return jnp.einsum("...e,ef->...f", x, w)
    return int8_matmul(x, w, scale)
