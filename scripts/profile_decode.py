"""Where a batch-1 decode step of SmolLM2-135M-Instruct spends its time: the 30 layers against the output head.

    .venv/bin/python scripts/profile_decode.py                  # float32
    .venv/bin/python scripts/profile_decode.py --quantize int8  # int8 weights (rj.load(..., quantize="int8"))

Times 40 cached one-token forwards inside one jitted fori_loop, (a) returning only the cache (XLA then drops the
unused head) and (b) feeding back the argmax of the logits (layers + head + argmax), and reports ms per step.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", choices=["int8"], default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import rss_jax as rj
    from rss_jax.cache import init_cache
    from rss_jax.models.base import decode_model

    lm = rj.load("smollm2-135m-instruct", quantize=args.quantize)
    steps = 40

    def make(with_head: bool):
        @jax.jit
        def run(state):
            model = decode_model(lm.graphdef, state)
            cache = init_cache(lm.config, 1, 160)
            lengths = jnp.array([20], jnp.int32)

            def step(i, carry):
                cache, tok = carry
                logits, cache = model(tok[:, None], cache=cache, lengths=lengths + i)
                if with_head:
                    tok = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
                return cache, tok
            return jax.lax.fori_loop(0, steps, step, (cache, jnp.array([5], jnp.int32)))
        return run

    for name, with_head in [("layers only (head unused)", False), ("layers + head + argmax", True)]:
        fn = make(with_head)
        jax.block_until_ready(fn(lm.state))
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(fn(lm.state))
            best = min(best, time.perf_counter() - t)
        print(f"{name:28s} {best / steps * 1000:6.2f} ms per token")


if __name__ == "__main__":
    main()
