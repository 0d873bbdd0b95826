"""Decode speed on an accelerator with random weights of real shapes: AR, SD, EFT and SSS, bfloat16, batch 1.

Made for a GPU/TPU machine with JAX already installed and no network (nothing is downloaded; no tokenizer): run it
through scripts/bench_device.sh, which caps it at 8 minutes. Pairs:

* SmolLM2-135M-shaped target with two feature-draft heads (aligned and SFT) of its shape;
* a Llama-3-8B-shaped target with two 0.5B-shaped separate drafts (Qwen2-0.5B's widths with the target's
  128256-token vocabulary) and with two feature-draft heads.

With random weights every distribution is close to uniform, so the acceptance the run sees says nothing about real
drafts. What it measures is the cost of one block (K draft steps + one verification), and of one AR step; the speed a
real draft would give is then projected from those costs with the per-token acceptance measured on CPU with the real
model (docs/feature_heads.md: heads about 0.5 at T = 0.8; separate v2 drafts about 0.4): expected tokens per block
(1 - a^(K+1)) / (1 - a) divided by the block's time. The AR row also gives the fraction of the bandwidth roofline
(weight + KV bytes read per step over the chip's peak bandwidth).

    python scripts/bench_device.py --out results/bench_device.json        # on the accelerator (via bench_device.sh)
    python scripts/bench_device.py --smoke                                # tiny shapes on CPU, seconds (the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# peak memory bandwidth in GB/s by device kind (vendor figures); --bandwidth-gbs overrides
BANDWIDTH = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300, "TPU v5 lite": 819, "TPU v5e": 819,
             "TPU v5p": 2765, "TPU v6": 1640, "TPU v4": 1228}

SHAPES = {  # name -> ModelConfig keywords (Llama family)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0),
    "draft-0.5b": dict(vocab_size=128256, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, max_position_embeddings=8192, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    # --smoke
    "tiny-target": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=512),
    "tiny-draft": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=16, max_position_embeddings=512),
}


def random_lm(name: str, seed: int, dtype: str):
    import jax.numpy as jnp
    from flax import nnx

    from rss_jax.lm import LM
    from rss_jax.models import build_model
    from rss_jax.models.config import ModelConfig
    config = ModelConfig(family="llama", model_type=name, **SHAPES[name])
    graphdef, state = nnx.split(build_model(config, seed, {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]))
    return LM(config=config, graphdef=graphdef, state=state, source=f"random {name}", dtype=dtype)


def n_params(lm) -> int:
    import jax
    return int(sum(x.size for x in jax.tree.leaves(lm.state)))


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per block of speculative sampling with per-token acceptance alpha and K draft tokens."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def device_bandwidth(kind: str, override):
    if override:
        return float(override)
    for key, bw in BANDWIDTH.items():
        if key.lower() in kind.lower():
            return float(bw)
    return None


def timed(fn, repeats: int):
    """(last output, best wall seconds, compile seconds of the first call) over `repeats` calls after one warm-up
    call (which compiles)."""
    out = fn()
    compile_s = out.stats.get("compile_s")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens (CPU, for the tests)")
    ap.add_argument("--pairs", default=None, help="comma list of pairs to run: smollm2,llama3-8b (default: both)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (smollm2), 64 (8B), 8 (smoke)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--alpha-head", type=float, default=0.5,
                    help="per-token acceptance of a trained feature head (measured on CPU, docs/feature_heads.md)")
    ap.add_argument("--alpha-draft", type=float, default=0.4,
                    help="per-token acceptance of a trained separate draft (v2 drafts on CPU)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="peak memory bandwidth (default: by device)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import rss_jax as rj
    from rss_jax.report import table, write_json

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    dtype = "float32" if args.smoke else "bfloat16"
    bw = device_bandwidth(kind, args.bandwidth_gbs)
    if args.smoke:
        pairs = {"tiny": ("tiny-target", "tiny-draft", 8)}
    else:
        pairs = {"smollm2": ("smollm2-135m", None, 128), "llama3-8b": ("llama3-8b", "draft-0.5b", 64)}
        if args.pairs:
            pairs = {k: v for k, v in pairs.items() if k in args.pairs.split(",")}
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    for pair, (target_name, draft_name, default_n) in pairs.items():
        n = args.max_new_tokens or default_n
        target = random_lm(target_name, 0, dtype)
        vocab = target.config.vocab_size
        prompt = [rng.integers(10, vocab - 10, 32).tolist()]
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target.state))
        c = target.config
        kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * (2 if dtype == "bfloat16" else 4)
        heads = (rj.heads.new_head(target, seed=1), rj.heads.new_head(target, seed=2))
        if dtype == "bfloat16":
            heads = tuple(_cast_head(h) for h in heads)
        drafts = {"heads": heads}
        if draft_name is not None:
            drafts["draft"] = (random_lm(draft_name, 3, dtype), random_lm(draft_name, 4, dtype))
        common = dict(max_new_tokens=n, temperature=args.temperature, eos=[], seed=0)
        runs = [("ar", None, {})]
        for dname, (aligned, sft) in drafts.items():
            runs += [("sd", dname, dict(draft=sft, k=args.k)), ("eft", dname, dict(draft=aligned, sft=sft)),
                     ("sss", dname, dict(draft=aligned, sft=sft, k=args.k))]
        ar_tps = None
        for method, dname, kw in runs:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{pair}/{method}/{dname}")
                continue
            out, wall, compile_s = timed(lambda: rj.generate(target, prompt, method=method, **kw, **common),
                                         args.repeats)
            new = int(out.stats["new_tokens"])
            row = {"pair": pair, "method": method, "draft": dname, "new_tokens": new, "wall_s": wall,
                   "tokens_per_s": new / wall, "compile_s": compile_s,
                   "params_target": n_params(target)}
            if method == "ar":
                ar_tps = new / wall
                step_s = wall / new
                bytes_step = weight_bytes + kv_bytes_per_token * (len(prompt[0]) + n / 2)
                row["step_ms"] = 1e3 * step_s
                row["achieved_gbs"] = bytes_step / step_s / 1e9
                row["roofline_fraction"] = row["achieved_gbs"] / bw if bw else None
            if method in ("sd", "sss"):
                blocks = max(int(out.stats["blocks"]), 1)
                block_s = wall / blocks
                alpha = args.alpha_head if dname == "heads" else args.alpha_draft
                row.update(block_ms=1e3 * block_s, acceptance_random=out.stats["acceptance_rate"],
                           alpha_assumed=alpha,
                           projected_tokens_per_s=expected_tokens(alpha, args.k) / block_s)
                row["projected_vs_ar"] = row["projected_tokens_per_s"] / ar_tps if ar_tps else None
            if ar_tps:
                row["vs_ar"] = row["tokens_per_s"] / ar_tps
            rows.append(row)
            print(f"{pair:10s} {method:4s} {str(dname):6s} {row['tokens_per_s']:9.1f} tok/s"
                  + (f"  projected {row['projected_tokens_per_s']:9.1f}" if "projected_tokens_per_s" in row else "")
                  + (f"  roofline {row['roofline_fraction']:.2f}" if row.get("roofline_fraction") else ""),
                   flush=True)
        del target, drafts
    cols = ["pair", "method", "draft", "tokens_per_s", "vs_ar", "step_ms", "block_ms", "acceptance_random",
            "alpha_assumed", "projected_tokens_per_s", "projected_vs_ar", "roofline_fraction", "compile_s"]
    print(table(rows, cols, title=f"{kind}, {dtype}, batch 1, K={args.k}, T={args.temperature} (random weights)"))
    result = {"device": kind, "platform": jax.default_backend(), "devices": len(jax.devices()),
              "host": platform.node(), "dtype": dtype, "bandwidth_gbs": bw, "k": args.k,
              "temperature": args.temperature, "rows": rows, "skipped": skipped,
              "total_s": time.perf_counter() - t_start, "command": " ".join(["python"] + sys.argv)}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


def _cast_head(head):
    import dataclasses

    import jax
    import jax.numpy as jnp
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), head.state)
    return dataclasses.replace(head, state=state, dtype="bfloat16")


if __name__ == "__main__":
    main()
