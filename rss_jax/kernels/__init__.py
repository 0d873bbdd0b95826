"""Hand-written CPU kernels, reached through JAX's FFI (`jax.ffi`), with a pure-XLA path beside each.

Both products read one layer of a stacked [L, ...] weight array in place (`layer=`), so a decode loop runs every
layer's products on the model's own weights without copying them out of the stack first (`LayerWeight`).

`dense_matmul` multiplies float32 activations by float32 or bfloat16 weights [K, N] (the layout the models store),
widening bfloat16 inside the product and accumulating in float32. XLA on CPU runs bfloat16 products at a fraction of
float32's speed (bound by arithmetic, not by reading the weights), and a decode loop that hands XLA per-layer
weights has to copy them out of the stacked arrays at every call.

`int8_matmul` multiplies float activations by int8 weights stored out-channel-major, with one float scale per group
of 32 consecutive input weights of each output channel (`quantize_rows`). XLA on CPU has no fast kernel for that
product: written as `x @ (w.astype(f32) * s)` it runs at about half the speed of a float32 product, because the
widened weights are written out before the product reads them. The kernel here (matmul.cc) widens each weight
inside the product, so the weights are read once at one byte each; rows of the output are split over XLA's own
intra-op thread pool.

`cached_attention` attends a few new tokens per row over one layer of the stacked KV cache, read in place and only
up to each row's length, and over the new tokens' own keys and values (the caller writes those into the cache
afterwards): XLA's form of the same sums copied each layer's slots out of the stack and ran several small products
over every slot at every step.

The kernel is compiled at first use with the machine's C++ compiler (`$CXX`, else c++ or g++) for its own vector
extensions, and the library is kept under $RSS_JAX_CACHE/kernels keyed by the source, the flags, the jaxlib version
and the processor. Where there is no compiler, or the backend is not the CPU, or `RSS_JAX_INT8_KERNEL=off`, the
product goes through XLA instead (same result up to float rounding; slower on CPU; on GPU and TPU XLA fuses the
widening into its product, not measured here).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

KERNEL_ENV = "RSS_JAX_INT8_KERNEL"  # the name predates the float kernel; it switches both
TARGET = "rss_jax_int8_matmul"
DENSE_TARGET = "rss_jax_dense_matmul"
DENSE_ROWS_TARGET = "rss_jax_dense_rows_matmul"
ATTENTION_TARGET = "rss_jax_cached_attention"
# above this many activation rows (a prefill) the product is bound by arithmetic, and XLA's float product of the
# widened weights is the faster path
KERNEL_MAX_ROWS = 64
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "matmul.cc")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_path(cxx: str) -> str:
    import jaxlib
    from rss_jax.loading import cache_root
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"|".join([source, " ".join(_FLAGS).encode(), cxx.encode(), jaxlib.__version__.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    root = cache_root()
    if root is None:  # RSS_JAX_CACHE=off: a private folder of this process, never a shared, predictable path
        return os.path.join(tempfile.mkdtemp(prefix="rss_jax_kernels_"), f"matmul-{key}.so")
    return os.path.join(root, "kernels", f"matmul-{key}.so")


def _build(cxx: str, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-1500:]}")
        os.replace(tmp, out)  # a finished library or none: never a half-written one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
    """Build (once per machine) and register the kernel; False, with one warning, where that is not possible."""
    if os.environ.get(KERNEL_ENV, "auto").lower() in ("off", "0", "false", "no"):
        return False
    cxx = _compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found (set $CXX): decode products use XLA's slower path on this CPU")
        return False
    try:
        path = _library_path(cxx)
        if not os.path.exists(path):
            _build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RssJaxInt8Matmul), platform="cpu")
        jax.ffi.register_ffi_target(DENSE_TARGET, jax.ffi.pycapsule(lib.RssJaxDenseMatmul), platform="cpu")
        jax.ffi.register_ffi_target(DENSE_ROWS_TARGET, jax.ffi.pycapsule(lib.RssJaxDenseRowsMatmul), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.RssJaxCachedAttention), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure leaves the XLA path, which is always correct
        warnings.warn(f"the CPU product kernels are not available ({type(e).__name__}: {e}); decode products use "
                      "XLA's slower path")
        return False
    return True


def kernel_available() -> bool:
    """Whether decode products on this process's default backend go through the hand-written CPU kernels."""
    return jax.default_backend() == "cpu" and _registered()


class LayerWeight:
    """Layer `index` of a stacked weight array [L, ...] (and of its int8 scales), as a decode loop hands it to
    `layers.linear`: the kernels read that layer in place; their XLA paths slice it out."""

    def __init__(self, stacked, index: int, scale=None):
        self.stacked, self.index, self.scale = stacked, index, scale


def _layer_shape(w, layer):
    """(layer, the shape of one layer) with a 2-D array seen as a stack of one."""
    return (0, w.shape) if layer is None else (int(layer), w.shape[1:])


def _rows(x):
    lead = x.shape[:-1]
    return lead, (int(np.prod(lead)) if lead else 1)


def dense_matmul(x, w, layer: int | None = None, out_dtype=None):
    """x [..., K] float times float32 or bfloat16 weights w [K, N] (or layer `layer` of a stack [L, K, N]) ->
    [..., N] in `out_dtype` (default x's dtype). The CPU kernel computes in float32 (bfloat16 x and weights are
    widened; the weights inside the product); the XLA path is `einsum` in x's dtype, except bfloat16 weights on the
    CPU, which it widens to float32 first."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    layer, (k, n) = _layer_shape(w, layer)
    if x.shape[-1] != k or w.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dense_matmul needs x [..., K] and float32 or bfloat16 weights [(L,) K, N]; got x {x.shape}"
                         f", w {w.shape} {w.dtype}")
    lead, rows = _rows(x)
    if 0 < rows <= KERNEL_MAX_ROWS and kernel_available():
        call = jax.ffi.ffi_call(DENSE_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32), vmap_method="sequential")
        y = call(x.reshape(rows, k).astype(jnp.float32), w, layer=np.int64(layer))
        return y.reshape(*lead, n).astype(out_dtype)
    ws = w if w.ndim == 2 else w[layer]
    if ws.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        # a prefill: XLA's CPU products are several times faster in float32 than in bfloat16, and widening one
        # layer's weights for one product costs less than the difference
        return jnp.einsum("...k,kn->...n", x.astype(jnp.float32), ws.astype(jnp.float32)).astype(out_dtype)
    return jnp.einsum("...k,kn->...n", x, ws.astype(x.dtype), preferred_element_type=out_dtype)


def rows_kernel_pays(rows: int, dtype) -> bool:
    """Whether `dense_rows_matmul` hands `rows` activation rows against [N, K] weights of `dtype` to the kernel: from
    2 to 7 rows, and one row of bfloat16 weights (XLA's one-row bfloat16 product on CPU widens the whole table at
    every call; its one-row float32 product already reads the table at the memory's speed, and from 8 rows on its
    blocked product is as fast). `scripts/bench_matmul.py --head` times both ways on the machine at hand."""
    if rows == 1:
        return jnp.dtype(dtype) == jnp.bfloat16
    return 2 <= rows <= 7


def dense_rows_matmul(x, w, out_dtype=None):
    """x [..., K] float times float32 or bfloat16 weights w [N, K] stored output-major (a token table that the output
    head is tied to, a trimmed head's rows) -> x @ w.T, [..., N] in `out_dtype` (default x's dtype). The CPU kernel
    reads each weight row once, straight from the table, for up to KERNEL_MAX_ROWS activation rows, in float32;
    the XLA path is `einsum` accumulating in `out_dtype`. Where `rows_kernel_pays` says no, XLA's path is taken.
    The kernel has no gradient: decode loops only (`models.base.decode_model` marks the modules that may use it)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if w.ndim != 2 or x.shape[-1] != w.shape[1] or w.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dense_rows_matmul needs x [..., K] and float32 or bfloat16 weights [N, K]; got x {x.shape}"
                         f", w {w.shape} {w.dtype}")
    lead, rows = _rows(x)
    n, k = w.shape
    if rows_kernel_pays(rows, w.dtype) and kernel_available():
        call = jax.ffi.ffi_call(DENSE_ROWS_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32),
                                vmap_method="sequential")
        y = call(x.reshape(rows, k).astype(jnp.float32), w)
        return y.reshape(*lead, n).astype(out_dtype)
    return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=out_dtype)


def int8_matmul(x, w, scale, out_dtype=None, layer: int | None = None):
    """x [..., K] float, w [N, K] int8, scale [N, G] (G groups of K / G weights along K, each with its own scale;
    G = 1 is one scale per output channel) -> [..., N] in `out_dtype` (default x's dtype): x @ dequantize(w).T.
    With `layer`, w [L, N, K] and scale [L, N, G] are stacks and layer `layer` of them is used.

    The CPU kernel computes in float32 (a bfloat16 x is widened first); the XLA path computes in x's dtype and
    accumulates in `out_dtype`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    layer, wshape = _layer_shape(w, layer)
    sshape = scale.shape if scale.ndim == 2 else scale.shape[1:]
    if (w.dtype != jnp.int8 or len(wshape) != 2 or len(sshape) != 2 or scale.ndim != w.ndim
            or sshape[0] != wshape[0] or wshape[1] % sshape[1] or x.shape[-1] != wshape[1]):
        raise ValueError(f"int8_matmul needs x [..., K], w [(L,) N, K] int8 and scale [(L,) N, G] with G dividing K; "
                         f"got x {x.shape}, w {w.shape} {w.dtype}, scale {scale.shape}")
    lead, rows = _rows(x)
    n, k = wshape
    if 0 < rows <= KERNEL_MAX_ROWS and kernel_available():
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32), vmap_method="sequential")
        scale_layer = layer
        if scale.dtype != jnp.float32 and scale.ndim == 3:  # widen this layer's scales only, not the whole stack
            scale, scale_layer = scale[layer], 0
        y = call(x.reshape(rows, k).astype(jnp.float32), w, scale.astype(jnp.float32), layer=np.int64(layer),
                 scale_layer=np.int64(scale_layer))
        return y.reshape(*lead, n).astype(out_dtype)
    if w.ndim == 3:
        w, scale = w[layer], scale[layer]
    return jnp.einsum("...k,nk->...n", x, dequantize_rows(w, scale, x.dtype), preferred_element_type=out_dtype)


def attention_kernel_available(cache_dtype) -> bool:
    """Whether `cached_attention` over a cache of `cache_dtype` runs in the CPU kernel here (off a mesh)."""
    return (jnp.dtype(cache_dtype) in (jnp.float32, jnp.bfloat16) and kernel_available()
            and jax.sharding.get_abstract_mesh().empty)


def cached_attention(q, cache_k, cache_v, layer: int, new_k, new_v, lengths):
    """Attention of T new tokens per row over layer `layer` of a stacked cache [L, B, S, KVH, D] as it was before
    they were written, and over their own keys and values: query t of row b sees the cache slots s < lengths[b] and
    the new tokens 0..t, under one softmax. q [B, T, KVH, G, D] (G query heads per KV head), new_k/new_v
    [B, T, KVH, D] -> [B, T, KVH, G, D] float32.

    The CPU kernel reads the cache in place (no copy of the layer's slots), and only each row's valid slots; where
    it is not available, or the cache is neither float32 nor bfloat16, the same law runs through XLA. The kernel has
    no gradient: decode loops only."""
    b, t, kvh, g, d = q.shape
    if (cache_k.ndim != 5 or cache_k.shape != cache_v.shape or cache_k.shape[1] != b or cache_k.shape[3:] != (kvh, d)
            or new_k.shape != (b, t, kvh, d) or new_v.shape != new_k.shape or lengths.shape != (b,)):
        raise ValueError(f"cached_attention needs q [B, T, KVH, G, D], caches [L, B, S, KVH, D], new k/v [B, T, KVH, "
                         f"D] and lengths [B]; got q {q.shape}, caches {cache_k.shape}/{cache_v.shape}, new "
                         f"{new_k.shape}/{new_v.shape}, lengths {lengths.shape}")
    if cache_k.dtype == cache_v.dtype and attention_kernel_available(cache_k.dtype):
        call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
        return call(q.astype(jnp.float32) / np.float32(np.sqrt(d)), cache_k, cache_v, new_k.astype(jnp.float32),
                    new_v.astype(jnp.float32), lengths.astype(jnp.int32), layer=np.int64(layer))
    from rss_jax.models.layers import split_attention
    return split_attention(q, cache_k[layer], cache_v[layer], new_k, new_v, lengths)


GROUP = 32  # weights per scale along the input axis (the block size of GGUF's Q8_0 and Q4 formats)


def quantize_rows(w, group: int = GROUP, scale_dtype=jnp.float32):
    """Symmetric int8 in groups: w [..., N, K] -> (q int8 [..., N, K], scale float32 [..., N, K // group]) with
    w ≈ q * scale repeated over each group of `group` consecutive weights along K (scale = max |w| / 127 of the
    group, rounded to `scale_dtype` before q is computed, so that q matches the scale the model stores). A K that
    `group` does not divide gets one scale per row."""
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[-1]
    g = group if group and k % group == 0 else k
    blocks = w.reshape(*w.shape[:-1], k // g, g)
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(scale_dtype).astype(jnp.float32)
    q = jnp.clip(jnp.round(blocks / scale), -127, 127).astype(jnp.int8)
    return q.reshape(w.shape), scale[..., 0]


def quantize_param(owner, name: str, transpose: bool) -> None:
    """Replace the float Param `name` of an nnx module `owner` by int8 rows and add `<name>_scale`, in place (the
    scales in the Param's dtype; `transpose` turns an [..., in, out] matrix into the [..., out, in] rows the product
    reads). Absent or already int8 Params are left alone."""
    from flax import nnx
    p = getattr(owner, name, None)
    if p is None or p.value.dtype == jnp.int8:
        return
    w = jnp.swapaxes(p.value, -1, -2) if transpose else p.value
    q, scale = quantize_rows(w, scale_dtype=p.value.dtype)
    setattr(owner, name, nnx.Param(q))
    setattr(owner, name + "_scale", nnx.Param(scale.astype(p.value.dtype)))


def dequantize_rows(q, scale, dtype=jnp.float32):
    """q [..., N, K] int8, scale [..., N, G] -> [..., N, K] in `dtype`."""
    g = q.shape[-1] // scale.shape[-1]
    return (q.astype(dtype).reshape(*q.shape[:-1], scale.shape[-1], g) * scale.astype(dtype)[..., None]).reshape(
        q.shape)
