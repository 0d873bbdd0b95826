"""A first-principles projection of batch-1 decode speed and of the SSS speed-up on accelerators (docs/SCALING.md).

Nothing is measured here. At batch 1 a decode step is memory-bound: it reads every weight once plus the KV cache of
the context, so a step takes at least bytes / bandwidth. The model sizes are counted from the architectures' shapes
(bfloat16, 2 bytes per parameter), the chips' figures are the vendors' (peak HBM bandwidth, HBM per chip). A model
that does not fit one chip's memory (with 20 % kept for caches and activations) is spread over the fewest
power-of-two chips that hold it, with tensor parallelism assumed ideal (bandwidth adds up; collectives are not
counted, which flatters multi-chip rows).

Speculative sampling at per-token acceptance a with K draft tokens yields E = (1 - a^(K+1)) / (1 - a) tokens per
block. A block costs K draft steps, one target verification of K+1 tokens (memory-bound: the cost of one target
step) and, for SSS, one pass of the SFT draft over the K+1 positions (the cost of one draft step). EFT needs the
target and both drafts at every token. So, with t and d the target's and a draft's step times:

    AR  : 1 token per t              SD : E tokens per (K d + t)
    EFT : 1 token per (t + 2 d)      SSS: E tokens per ((K + 1) d + t)

    python scripts/scaling_projection.py --out results/scaling_projection.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHIPS = {  # peak HBM bandwidth GB/s, HBM GB per chip (vendor figures)
    "TPU v5e": (819, 16), "TPU v5p": (2765, 95), "TPU v6e": (1640, 32), "H100 SXM": (3350, 80),
    "H200": (4800, 141),
}


def llama_params(vocab, hidden, inter, layers, heads, kv_heads, head_dim, tied):
    attn = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2
    mlp = 3 * hidden * inter
    emb = vocab * hidden * (1 if tied else 2)
    return layers * (attn + mlp + 2 * hidden) + emb + hidden


def opt_params(vocab, hidden, inter, layers, proj=None):
    attn = 4 * hidden * hidden + 4 * hidden
    mlp = 2 * hidden * inter + inter + hidden
    emb = vocab * (proj or hidden) + 2050 * hidden + (2 * proj * hidden if proj else 0)
    return layers * (attn + mlp + 4 * hidden) + emb


def head_params(hidden, inter, heads, kv_heads, head_dim, taps=3, draft_vocab=32768):
    """A feature-draft head: tap fusion, input map, one decoder layer; it reads the target's embedding row and
    `draft_vocab` rows of the target's output matrix every step (counted as bytes read, not as its parameters)."""
    layer = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2 + 3 * hidden * inter
    own = taps * hidden * hidden + 2 * hidden * hidden + layer
    return own, draft_vocab * hidden


MODELS = {
    # name: (parameters, KV bytes per context token in bfloat16)
    "Llama-3-8B": (llama_params(128256, 4096, 14336, 32, 32, 8, 128, False), 2 * 32 * 8 * 128 * 2),
    "Qwen2-0.5B-shaped draft (128k vocab)": (llama_params(128256, 896, 4864, 24, 14, 2, 64, True),
                                             2 * 24 * 2 * 64 * 2),
    "OPT-13B": (opt_params(50272, 5120, 20480, 40), 2 * 40 * 5120 * 2),
    "OPT-350m": (opt_params(50272, 1024, 4096, 24, proj=512), 2 * 24 * 1024 * 2),
}


def step_seconds(params, kv_per_token, context, chip, extra_bytes=0.0):
    bw, hbm = CHIPS[chip]
    weight_bytes = 2.0 * params
    chips = 1
    while weight_bytes > 0.8 * hbm * 1e9 * chips:
        chips *= 2
    total = weight_bytes + extra_bytes + kv_per_token * context
    return total / (bw * 1e9 * chips), chips


def expected_tokens(alpha, k):
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512, help="context tokens whose KV cache each step reads")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--alphas", default="0.5,0.7", help="per-token acceptances to project at")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from rss_jax.report import table, write_json
    alphas = [float(a) for a in args.alphas.split(",")]
    h_own, h_rows = head_params(4096, 14336, 32, 8, 128)
    pairs = [("Llama-3-8B", "Qwen2-0.5B-shaped draft (128k vocab)", "0.5B draft"),
             ("OPT-13B", "OPT-350m", "OPT-350m draft"),
             ("Llama-3-8B", None, "feature head")]
    rows = []
    for chip in CHIPS:
        for target, draft, label in pairs:
            tp, tkv = MODELS[target]
            t, chips = step_seconds(tp, tkv, args.context, chip)
            if draft is None:  # the head's own weights + the draft-vocabulary rows of the output matrix
                d = (2.0 * (h_own + h_rows) + 2 * 4096 * 2 * args.context) / (CHIPS[chip][0] * 1e9 * chips)
                dp = h_own
            else:
                dp, dkv = MODELS[draft]
                d = (2.0 * dp + dkv * args.context) / (CHIPS[chip][0] * 1e9 * chips)
            row = {"chip": chip, "chips": chips, "target": target, "draft": label,
                   "target_GB": 2 * tp / 1e9, "draft_GB": 2 * dp / 1e9, "AR tok/s": 1 / t,
                   "d/t": d / t, "EFT tok/s": 1 / (t + 2 * d)}
            for a in alphas:
                e = expected_tokens(a, args.k)
                sss = e / ((args.k + 1) * d + t)
                row[f"SSS tok/s a={a}"] = sss
                row[f"SSS/AR a={a}"] = sss * t
                row[f"SSS/EFT a={a}"] = sss * (t + 2 * d)
            rows.append(row)
    cols = ["chip", "chips", "target", "draft", "target_GB", "AR tok/s", "d/t", "EFT tok/s"]
    for a in alphas:
        cols += [f"SSS tok/s a={a}", f"SSS/AR a={a}", f"SSS/EFT a={a}"]
    print(table(rows, cols, title=f"PROJECTION (not measured): batch 1, bfloat16, context {args.context}, "
                                  f"K={args.k}"))
    if args.out:
        write_json(args.out, {"projection": True, "context": args.context, "k": args.k, "alphas": alphas,
                              "chips": CHIPS, "rows": rows, "command": " ".join(["python"] + sys.argv)})
    return rows


if __name__ == "__main__":
    main()
