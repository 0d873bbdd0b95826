"""What every causal LM family shares: the cached forward signature and the output head."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.cache import KVCache
from rss_jax.kernels import (LayerWeight, dense_rows_matmul, dequantize_rows, int8_matmul, kernel_available,
                             quantize_param)
from rss_jax.models.config import check_token_ids
from rss_jax.models.layers import default_positions


def normal_init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


LAYER_LOOP_ENV = "RSS_JAX_LAYER_LOOP"


def unroll_layers(layer_bytes: int, float32: bool = True, in_place: bool = False) -> bool:
    """Whether decode loops run the layers as an unrolled loop over per-layer weights instead of a scan over the
    stacked weights. `RSS_JAX_LAYER_LOOP` = `unroll` or `scan` decides; by default (`auto`) it is unroll on the CPU
    backend when the CPU kernels read each layer in place (`in_place`: no copy), or, without them, for float32
    weights when two copies of the layer weights take at most half the host's memory (the per-layer buffers then
    live beside the stacked ones for the length of a call), and scan elsewhere. XLA on GPU and TPU reads a scanned
    layer's weights in place; XLA on CPU copies them out at every step, which costs float32 decoding about a third
    of its speed. XLA's own bfloat16 products on CPU are bound by arithmetic and ran at half speed unrolled
    (docs/benchmarks.md), so without the kernels bfloat16 keeps the scan."""
    mode = os.environ.get(LAYER_LOOP_ENV, "auto")
    if mode not in ("auto", "unroll", "scan"):
        raise ValueError(f"{LAYER_LOOP_ENV}={mode!r} is not a layer loop; set it to auto, unroll or scan")
    if mode != "auto":
        return mode == "unroll"
    if jax.default_backend() != "cpu":
        return False
    if in_place:
        return True
    if not float32:
        return False
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return 4 * layer_bytes <= host


def compute_dtype(tree):
    """The float dtype a model (or its state, or any pytree of its weights) computes in: its first floating leaf
    (int8 weights of a quantised model are skipped; their scales carry the compute dtype)."""
    for leaf in jax.tree.leaves(nnx.state(tree) if isinstance(tree, nnx.Module) else tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


def decode_model(graphdef, state):
    """nnx.merge for a function that runs the model inside a decode loop. Where `unroll_layers` says so, the
    layers run as an unrolled loop over per-layer weights (see `layers.scan_layers`): with the CPU kernels
    (`kernels.kernel_available`, off a mesh) each matrix is a `kernels.LayerWeight` that the kernel reads in place
    from the stacked array, and only the small per-layer vectors (norms, biases) are sliced out; without them every
    layer's weights are sliced out here, once, before the loop, so the loop body reads them in place at every step.
    Other modules are merged as they are."""
    model = nnx.merge(graphdef, state)
    # output heads of this merged copy may use the CPU kernels, which have no gradient (`head_product`)
    object.__setattr__(model, "_decode_kernels", kernel_available() and jax.sharding.get_abstract_mesh().empty)
    if isinstance(model, CausalLM) and model.config.num_layers > 0:
        stacked = model.stacked_layer_params()
        size = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in stacked.values())
        dtypes = {a.dtype for a in stacked.values()}
        int8 = jnp.dtype(jnp.int8)
        matrices = set(model.QUANT_LAYER_PARAMS) & set(stacked)
        in_place = (bool(matrices) and kernel_available() and jax.sharding.get_abstract_mesh().empty
                    and all(stacked[n].dtype in (jnp.float32, jnp.bfloat16, int8) for n in matrices))
        # without the kernels, int8 weights read like float32 ones (their products widen them whatever the scales'
        # dtype): per-layer buffers pay there too
        if unroll_layers(size, dtypes <= {jnp.dtype(jnp.float32), int8} or int8 in dtypes, in_place):
            in_place_names = matrices if in_place else set()
            scales = {n + "_scale" for n in in_place_names}
            sliced = [{k: a[i] for k, a in stacked.items() if k not in in_place_names and k not in scales}
                      for i in range(model.config.num_layers)]
            # the barrier keeps XLA from sinking the slices back into the loop body
            sliced = jax.lax.optimization_barrier(sliced)
            per_layer = [dict(p, **{n: LayerWeight(stacked[n], i, stacked.get(n + "_scale")) for n in in_place_names})
                         for i, p in enumerate(sliced)]
            # a plain attribute of this traced, throw-away module, not a Variable: it is never split again
            object.__setattr__(model, "_layer_list", per_layer)
    return model


def head_product(module, h, rows):
    """h [..., E] times output rows [N, E] (a token table, a trimmed head's rows) -> float32 logits [..., N]. In a
    module that `decode_model` merged, float32 and bfloat16 rows go through `kernels.dense_rows_matmul` (the CPU
    kernel where it pays); elsewhere (training, which needs a gradient; meshes) it is an einsum in h's dtype.
    `rows` may also be a pair (int8 rows [N, E], scales [N, G]) from `kernels.quantize_rows` (an int8 head's W[D])."""
    if isinstance(rows, tuple):
        return int8_matmul(h, rows[0], rows[1], jnp.float32)
    if module.__dict__.get("_decode_kernels") and rows.dtype in (jnp.float32, jnp.bfloat16):
        return dense_rows_matmul(h, rows, jnp.float32)
    return jnp.einsum("...e,ve->...v", h, rows.astype(h.dtype), preferred_element_type=jnp.float32)


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

    def stacked_layer_params(self) -> dict:
        """The per-layer weights as a dict of stacked [L, ...] arrays (each family names its own)."""
        raise NotImplementedError(f"{type(self).__name__} does not define stacked_layer_params")

    def layer_params(self):
        """What `layers_forward` runs: per-layer dicts when `decode_model` sliced them, else the stacked dict."""
        per_layer = self.__dict__.get("_layer_list")
        return per_layer if per_layer is not None else self.stacked_layer_params()

    # the [L, in, out] matrices of `layers` that go through `layers.linear` (what decode loops hand the CPU kernels
    # in place, and what int8 weight-only quantisation (`quantize_int8`) stores as int8 [L, out, in] with scales
    # `<name>_scale` [L, out, in / 32], `kernels.quantize_rows`), and the token table's name
    QUANT_LAYER_PARAMS: tuple = ()
    EMBED_TABLE = "embed_tokens"

    def head_table_name(self) -> str:
        """The attribute holding the output head's [V, E] rows (the token table when they are tied)."""
        return self.EMBED_TABLE

    def _table(self, name):
        """(rows, per-row scales or None) of a [V, E] table attribute."""
        scale = getattr(self, name + "_scale", None)
        return getattr(self, name).value, (None if scale is None else scale.value)

    def lookup(self, name, tokens):
        """Rows `tokens` of table `name` ([..., E]), widened and scaled when the table is int8."""
        w, scale = self._table(name)
        rows = jnp.take(w, tokens, axis=0)
        return rows if scale is None else dequantize_rows(rows, jnp.take(scale, tokens, axis=0), scale.dtype)

    def dense_table(self, name):
        w, scale = self._table(name)
        return w if scale is None else dequantize_rows(w, scale, scale.dtype)

    def quantize_int8(self) -> None:
        """Replace the layer matrices, the token table and the output head by int8 copies with one scale per
        group of 32 input weights of each output channel (symmetric, max |w| / 127), in place; norms, biases and
        positions stay in the model's dtype. Products then widen the int8 weights inside the product
        (`rss_jax.kernels.int8_matmul`)."""
        for name in self.QUANT_LAYER_PARAMS:
            quantize_param(self.layers, name, transpose=True)
        tables = {self.EMBED_TABLE, self.head_table_name()} | ({"head_rows"} if self.config.head_token_ids else set())
        for name in sorted(tables):
            quantize_param(self, name, transpose=False)

    def head_weight(self):
        """The output head's raw [V, E] rows (int8 after quantisation)."""
        return getattr(self, self.head_table_name()).value

    def token_embeddings(self):
        """The token embedding table [V, E] in the model's dtype (what a feature-draft head embeds its input tokens
        with); an int8 table is widened here, once per call of a decode loop."""
        return self.dense_table(self.EMBED_TABLE)

    def output_matrix(self):
        """The output head as [V, E] rows (tied or untied) in the model's dtype, for feature-draft heads that score
        with it."""
        w = self.dense_table(self.head_table_name())
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
            rows, scale = self._table("head_rows")
            logits = int8_matmul(h, rows, scale, jnp.float32) if scale is not None else head_product(self, h, rows)
            # scatter into the full vocabulary as a gather: slot len(ids) of the padded row holds -inf
            where = np.full((self.config.vocab_size,), len(ids), np.int32)
            where[np.asarray(ids)] = np.arange(len(ids), dtype=np.int32)
            padded = jnp.concatenate([logits, jnp.full(logits.shape[:-1] + (1,), -jnp.inf, jnp.float32)], -1)
            return jnp.take(padded, jnp.asarray(where), axis=-1)
        w, scale = self._table(self.head_table_name())
        if scale is not None:  # int8 rows [V, E]
            return int8_matmul(h, w, scale, jnp.float32)
        if self.head_transposed:  # [E, V]
            return jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return head_product(self, h, w)

    head_transposed = False
