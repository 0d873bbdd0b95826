"""Hand-written CPU kernels, reached through JAX's FFI (`jax.ffi`), with a pure-XLA path beside each.

`int8_matmul` multiplies float activations by int8 weights stored out-channel-major, with one float scale per group
of 32 consecutive input weights of each output channel (`quantize_rows`). XLA on CPU has no fast kernel for that
product: written as `x @ (w.astype(f32) * s)` it runs at about half the speed of a float32 product, because the
widened weights are written out before the product reads them. The kernel here (int8_matmul.cc) widens each weight
inside the product, so the weights are read once at one byte each; rows of the output are split over XLA's own
intra-op thread pool.

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

KERNEL_ENV = "RSS_JAX_INT8_KERNEL"
TARGET = "rss_jax_int8_matmul"
# above this many activation rows (a prefill) the product is bound by arithmetic, and XLA's float product of the
# widened weights is the faster path
KERNEL_MAX_ROWS = 64
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_matmul.cc")
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
        return os.path.join(tempfile.mkdtemp(prefix="rss_jax_kernels_"), f"int8_matmul-{key}.so")
    return os.path.join(root, "kernels", f"int8_matmul-{key}.so")


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
        warnings.warn("no C++ compiler found (set $CXX): int8 products use XLA's slower path on this CPU")
        return False
    try:
        path = _library_path(cxx)
        if not os.path.exists(path):
            _build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RssJaxInt8Matmul), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure leaves the XLA path, which is always correct
        warnings.warn(f"the int8 CPU kernel is not available ({type(e).__name__}: {e}); int8 products use XLA's "
                      "slower path")
        return False
    return True


def kernel_available() -> bool:
    """Whether int8 products on this process's default backend go through the hand-written CPU kernel."""
    return jax.default_backend() == "cpu" and _registered()


def int8_matmul(x, w, scale, out_dtype=None):
    """x [..., K] float, w [N, K] int8, scale [N, G] (G groups of K / G weights along K, each with its own scale;
    G = 1 is one scale per output channel) -> [..., N] in `out_dtype` (default x's dtype): x @ dequantize(w).T.

    The CPU kernel computes in float32 (a bfloat16 x is widened first); the XLA path computes in x's dtype and
    accumulates in `out_dtype`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if (w.dtype != jnp.int8 or w.ndim != 2 or scale.ndim != 2 or scale.shape[0] != w.shape[0]
            or w.shape[1] % scale.shape[1] or x.shape[-1] != w.shape[1]):
        raise ValueError(f"int8_matmul needs x [..., K], w [N, K] int8 and scale [N, G] with G dividing K; got "
                         f"x {x.shape}, w {w.shape} {w.dtype}, scale {scale.shape}")
    lead, (n, k) = x.shape[:-1], w.shape
    rows = int(np.prod(lead)) if lead else 1
    if 0 < rows <= KERNEL_MAX_ROWS and kernel_available():
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32), vmap_method="sequential")
        y = call(x.reshape(rows, k).astype(jnp.float32), w, scale.astype(jnp.float32))
        return y.reshape(*lead, n).astype(out_dtype)
    return jnp.einsum("...k,nk->...n", x, dequantize_rows(w, scale, x.dtype), preferred_element_type=out_dtype)


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
