"""The matrix products a decode step is made of, alone: which weight layout and which dtype XLA runs fast here.

    .venv/bin/python scripts/bench_matmul.py              # -> results/bench_matmul.json

A stack of 30 MLP-shaped layer pairs of SmolLM2-135M ([576, 1536] then [1536, 576]) is applied to a batch of
activations 10 times inside one jitted fori_loop, as a decode loop applies its layers once per token. Rows:

* layout: `scan` (weights stacked [L, ...] and scanned, as a lax.scan over layers does) against `per-layer`
  (one buffer per layer, an unrolled loop);
* weight format (per-layer layout): float32; bfloat16; int8 with per-output-channel float32 scales, either
  converted to float32 inside the product (weight-only) or multiplied as int8 x int8 -> int32 after quantising the
  activations per row (dynamic quantisation).

GB/s is weight bytes read per second (the bound of a batch-1 decode step); `vs float32` is the time of the float32
per-layer row over this row's time (above 1 = faster). The same process, one row after the other.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/bench_matmul.json")
    args = ap.parse_args()

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
