"""The matrix products a decode step is made of, alone: which weight layout and which dtype XLA runs fast here.

    .venv/bin/python scripts/bench_matmul.py              # -> results/bench_matmul.json
    .venv/bin/python scripts/bench_matmul.py --head       # -> results/bench_matmul_head.json
    .venv/bin/python scripts/bench_matmul.py --attention  # -> results/bench_matmul_attention.json
    .venv/bin/python scripts/bench_matmul.py --dense --batch 1 2 3 4 5 8 16 64  # -> results/bench_matmul_dense.json

A stack of 30 MLP-shaped layer pairs of SmolLM2-135M ([576, 1536] then [1536, 576]) is applied to a batch of
activations 10 times inside one jitted fori_loop, as a decode loop applies its layers once per token. Rows:

* layout: `scan` (weights stacked [L, ...] and scanned, as a lax.scan over layers does) against `per-layer`
  (one buffer per layer, an unrolled loop);
* weight format (per-layer layout): float32; bfloat16; int8 with per-output-channel float32 scales, either
  converted to float32 inside the product (weight-only) or multiplied as int8 x int8 -> int32 after quantising the
  activations per row (dynamic quantisation).

GB/s is weight bytes read per second (the bound of a batch-1 decode step); `vs float32` is the time of the float32
per-layer row over this row's time (above 1 = faster). The same process, one row after the other.

`--dense`: the float32 dense kernel over 30 layers of SmolLM2's projection shapes at each --batch row count (a
decode step, a verification block of K + 1 rows, a batch), with its weight GB/s and its time against the fewest
rows. `--head`: the output head of SmolLM2-135M (random [49152, 576] rows, float32 and bfloat16) against 1-9
activation rows (--head-rows 8192: a feature head's draft vocabulary W[D]), as `kernels.dense_rows_matmul`'s CPU
kernel and as XLA's einsum (compiled with the decode loops' options);
what `kernels.rows_kernel_pays` decides from. `--attention`: the few-token attention of 30 layers of SmolLM2's shape
(3 KV heads, 3 query heads each, head size 64) over a cache, as block products (`layers._head_scores`, what the
decode loops run) and as the broadcast products reduced over the head size (what they ran before, and still run
above `layers.BLOCK_PRODUCT_MAX_KV_HEADS`), with the largest difference of the two results, and (where it is
built) as `kernels.cached_attention`'s CPU kernel, which the decode loops now run: it reads the stacked cache in
place and only up to each row's length (half the slots here), with its difference from the block form.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, E, F, STEPS = 30, 576, 1536, 10


def best_time(fn, *args, repeats):
    import jax
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def per_call(fn, *args, repeats, calls=10):
    """Best over `repeats` of the mean time of `calls` back-to-back calls (s)."""
    import jax
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            r = fn(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def bench_head(args):
    import jax
    import jax.numpy as jnp
    from rss_jax import kernels
    from rss_jax.decoding.common import compiler_options
    from rss_jax.report import machine, table, write_json

    if not kernels.kernel_available():
        raise SystemExit("the CPU kernels are not available here (no C++ compiler, not the CPU backend, or "
                         f"{kernels.KERNEL_ENV}=off): there is nothing to compare XLA's head product with")
    rng = np.random.default_rng(0)
    n_rows = args.head_rows
    table_f32 = jnp.asarray(rng.standard_normal((n_rows, E), dtype=np.float32) * 0.05)
    opts = compiler_options()
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        w = table_f32.astype(dtype)
        for m in (1, 2, 4, 5, 8, 9):
            x = jnp.asarray(rng.standard_normal((m, E), dtype=np.float32))
            kernel = lambda x, w: jax.ffi.ffi_call(  # noqa: E731
                kernels.DENSE_ROWS_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, w)
            xla = lambda x, w: jnp.einsum("mk,nk->mn", x, w.astype(x.dtype))  # noqa: E731
            t_k = per_call(jax.jit(kernel).lower(x, w).compile(opts), x, w, repeats=args.repeats)
            t_x = per_call(jax.jit(xla).lower(x, w).compile(opts), x, w, repeats=args.repeats)
            rows.append({"weights": jnp.dtype(dtype).name, "rows": m, "kernel ms": t_k * 1e3, "XLA ms": t_x * 1e3,
                         "XLA / kernel": t_x / t_k, "used": "kernel" if kernels.rows_kernel_pays(m, dtype) else "XLA"})
    title = f"output head [{n_rows}, 576] x rows^T, {machine()}"
    print(table(rows, title=title))
    write_json(args.out or "results/bench_matmul_head.json",
               {"machine": machine(), "rows": rows, "command": " ".join(sys.argv)})


def bench_attention(args):
    import jax
    import jax.numpy as jnp
    from rss_jax import kernels
    from rss_jax.decoding.common import compiler_options
    from rss_jax.models import layers
    from rss_jax.report import machine, table, write_json

    kvh, g, d = 3, 3, 64

    def broadcast(qg, keys, values, mask):  # the form the decode loops ran before the block products
        qf = qg.astype(jnp.float32)
        scores = jnp.sum(qf[:, :, None] * keys[:, None, :, :, None, :], axis=-1) / np.sqrt(d)
        probs = jax.nn.softmax(jnp.where(mask[:, :, :, None, None], scores, -1e30), axis=2)
        return jnp.sum(probs[..., None] * values[:, None, :, :, None, :], axis=2)

    def loop(fn):
        def run(q, k, v, mask):
            def step(_, acc):
                out = 0.0
                for layer in range(L):
                    out = out + fn(q[layer] + acc, k[layer], v[layer], mask)
                return acc + 1e-3 * out
            return jax.lax.fori_loop(0, STEPS, step, jnp.zeros_like(q[0]))
        return run

    rows = []
    rng = np.random.default_rng(0)
    for b, t, s in [(1, 1, 256), (1, 4, 256), (1, 5, 512), (8, 1, 256), (64, 1, 400)]:
        q = jnp.asarray(rng.standard_normal((L, b, t, kvh, g, d), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((L, b, s, kvh, d), dtype=np.float32))
        v = jnp.asarray(rng.standard_normal((L, b, s, kvh, d), dtype=np.float32))
        lengths = np.full((b,), s // 2)
        mask = jnp.asarray(np.arange(s)[None, None, :] <= (lengths[:, None] + np.arange(t)[None, :])[:, :, None])
        out, times = {}, {}
        for name, fn in (("block", layers._fused_short_attention), ("broadcast", broadcast)):
            c = jax.jit(loop(fn)).lower(q, k, v, mask).compile(compiler_options())
            out[name] = np.asarray(c(q, k, v, mask))
            times[name] = best_time(c, q, k, v, mask, repeats=args.repeats) / STEPS
        row = {"batch": b, "new tokens": t, "slots": s, "block ms": times["block"] * 1e3,
               "broadcast ms": times["broadcast"] * 1e3, "broadcast / block": times["broadcast"] / times["block"],
               "max diff": float(np.abs(out["block"] - out["broadcast"]).max())}
        if kernels.attention_kernel_available(jnp.float32):
            # the decode loops' form: the CPU kernel on the stacked cache, read in place up to the rows' lengths,
            # with the new tokens' keys and values apart (here the cache's own slots lengths..lengths+t-1, so the
            # law is the block form's)
            n0 = s // 2
            nk, nv = k[:, :, n0:n0 + t], v[:, :, n0:n0 + t]
            lens = jnp.asarray(lengths, jnp.int32)

            def run_kernel(q, k, v, nk, nv):
                def step(_, acc):
                    out = 0.0
                    for layer in range(L):
                        out = out + kernels.cached_attention(q[layer] + acc, k, v, layer, nk[layer], nv[layer], lens)
                    return acc + 1e-3 * out
                return jax.lax.fori_loop(0, STEPS, step, jnp.zeros_like(q[0]))
            c = jax.jit(run_kernel).lower(q, k, v, nk, nv).compile(compiler_options())
            got = np.asarray(c(q, k, v, nk, nv))
            tk = best_time(c, q, k, v, nk, nv, repeats=args.repeats) / STEPS
            row.update({"kernel ms": tk * 1e3, "block / kernel": times["block"] / tk,
                        "kernel diff": float(np.abs(got - out["block"]).max())})
        rows.append(row)
    title = f"few-token attention, 30 layers (3 KV heads x 3, head size 64), per step; {machine()}"
    print(table(rows, title=title))
    write_json(args.out or "results/bench_matmul_attention.json",
               {"machine": machine(), "rows": rows, "command": " ".join(sys.argv)})


def bench_dense(args):
    """The float32 dense kernel (`kernels.dense_matmul`, what the decode loops run for the layers' products) over
    30 layers of SmolLM2-135M's five projection shapes, at each row count of --batch: a decode step (1 row), a
    verification block (K + 1 rows), a batch. Rows are interleaved over the repeats, so a slow spell hits each."""
    import jax
    import jax.numpy as jnp

    from rss_jax import kernels
    from rss_jax.report import machine, table, write_json
    if not kernels.kernel_available():
        raise SystemExit("--dense: the CPU kernels are not built here (no compiler, or RSS_JAX_INT8_KERNEL=off)")
    shapes = [(E, 960), (E, E), (E, F), (E, F), (F, E)]  # q|k|v, o, gate, up, down
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((L, k, n), dtype=np.float32) * 0.02) for k, n in shapes]
    weight_bytes = sum(k * n for k, n in shapes) * L * 4

    @jax.jit
    def one_pass(x, ws):
        def step(_, x):
            for layer in range(L):
                h = x
                for (k, _n), w in zip(shapes, ws):
                    h = kernels.dense_matmul(h[:, :k], w, layer=layer)  # each output is at least as wide
                x = x + 1e-3 * h[:, :E]
            return x
        return jax.lax.fori_loop(0, STEPS, step, x)

    xs = {m: jnp.asarray(rng.standard_normal((m, E), dtype=np.float32)) for m in args.batch}
    for x in xs.values():
        jax.block_until_ready(one_pass(x, ws))
    best = dict.fromkeys(xs, float("inf"))
    for _ in range(args.repeats):
        for m, x in xs.items():
            t = time.perf_counter()
            jax.block_until_ready(one_pass(x, ws))
            best[m] = min(best[m], (time.perf_counter() - t) / STEPS)
    one = best[min(best)]
    rows = [{"rows": m, "ms per 30 layers": t * 1e3, "weight GB/s": weight_bytes / t / 1e9,
             f"vs {min(best)} row(s)": t / one, "GFLOP/s": 2 * m * weight_bytes / 4 / t / 1e9}
            for m, t in best.items()]
    print(table(rows, title=f"float32 dense kernel, 30 layers of SmolLM2-135M's projections, {machine()}"))
    write_json(args.out or "results/bench_matmul_dense.json",
               {"machine": machine(), "rows": rows, "command": " ".join(sys.argv)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--head", action="store_true", help="time the output-head product instead (kernel vs XLA)")
    ap.add_argument("--head-rows", type=int, default=49152, help="--head: output rows (49152, SmolLM2's "
                    "vocabulary; 8192, a feature head's draft vocabulary)")
    ap.add_argument("--attention", action="store_true", help="time few-token attention instead (block vs "
                    "broadcast products)")
    ap.add_argument("--dense", action="store_true", help="time the float32 dense kernel of the layers at each "
                    "--batch row count instead")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_matmul[_head|_attention|_dense]"
                    ".json)")
    args = ap.parse_args()
    if args.dense:
        return bench_dense(args)
    if args.head:
        return bench_head(args)
    if args.attention:
        return bench_attention(args)
    args.out = args.out or "results/bench_matmul.json"

    import jax
    import jax.numpy as jnp
    from rss_jax.report import machine, table, write_json

    rng = np.random.default_rng(0)
    up = rng.standard_normal((L, E, F), dtype=np.float32) * 0.05
    down = rng.standard_normal((L, F, E), dtype=np.float32) * 0.05

    def quantise(w):  # [in, out] -> int8 [in, out], scales [out]
        s = np.abs(w).max(axis=0) / 127.0
        return jnp.asarray(np.round(w / s).astype(np.int8)), jnp.asarray(s.astype(np.float32))

    def product(kind):
        if kind in ("float32", "bfloat16"):
            return lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        if kind == "int8 weight-only":
            return lambda x, w: jnp.dot(x, w[0].astype(jnp.float32)) * w[1]
        if kind == "int8 x int8 (dynamic)":
            def dyn(x, w):
                a = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + 1e-12
                xq = jnp.round(x / a).astype(jnp.int8)
                y = jax.lax.dot_general(xq, w[0], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
                return y.astype(jnp.float32) * a * w[1]
            return dyn
        raise ValueError(kind)

    def per_layer_loop(mm):
        @jax.jit
        def run(ups, downs, x):
            def step(_, h):
                for u, d in zip(ups, downs):
                    h = mm(jnp.tanh(mm(h, u)), d) * 0.05
                return h
            return jax.lax.fori_loop(0, STEPS, step, x)
        return run

    @jax.jit
    def scan_loop(ups, downs, x):
        def step(_, h):
            def body(h, w):
                return jnp.tanh(h @ w[0]) @ w[1] * 0.05, None
            return jax.lax.scan(body, h, (ups, downs))[0]
        return jax.lax.fori_loop(0, STEPS, step, x)

    rows = []
    f32_bytes = 2 * L * E * F * 4
    for b in args.batch:
        x = jnp.ones((b, E), jnp.float32)
        cases = [("scan", "float32", scan_loop, (jnp.asarray(up), jnp.asarray(down)), f32_bytes)]
        ups = [jnp.asarray(w) for w in up]
        downs = [jnp.asarray(w) for w in down]
        cases.append(("per-layer", "float32", per_layer_loop(product("float32")), (ups, downs), f32_bytes))
        cases.append(("per-layer", "bfloat16", per_layer_loop(product("bfloat16")),
                      ([w.astype(jnp.bfloat16) for w in ups], [w.astype(jnp.bfloat16) for w in downs]),
                      f32_bytes // 2))
        q_up, q_down = [quantise(w) for w in up], [quantise(w) for w in down]
        for kind in ("int8 weight-only", "int8 x int8 (dynamic)"):
            cases.append(("per-layer", kind, per_layer_loop(product(kind)), (q_up, q_down), f32_bytes // 4))
        base = None
        for layout, kind, fn, weights, nbytes in cases:
            t = best_time(fn, *weights, x, repeats=args.repeats) / STEPS
            if (layout, kind) == ("per-layer", "float32"):
                base = t
            rows.append({"batch": b, "layout": layout, "weights": kind, "ms per pass": t * 1e3,
                         "weight GB/s": nbytes / t / 1e9, "_t": t})
        for r in rows:
            if r["batch"] == b:
                r["vs float32"] = base / r.pop("_t")
    print(table(rows, title=f"30 MLP layer pairs of SmolLM2-135M, {machine()}"))
    write_json(args.out, {"machine": machine(), "rows": rows, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
