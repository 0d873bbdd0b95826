"""Autoregressive decoding speed on the real SmolLM2-135M-Instruct: rss_jax against transformers' `generate`.

    .venv/bin/python scripts/bench_decode.py                 # batch 1 and 8; float32, bfloat16 and int8; 128 tokens
    .venv/bin/python scripts/bench_decode.py --batch 1 --dtype float32 int8 --repeats 5

`int8` is `rj.load(..., quantize="int8")`: int8 weights with a scale per 32 weights, products in float32; its rows are
compared with transformers in float32 and with our own float32 row of the same batch ("vs float32"), and report the
int8 model's logit error against float32 on five chat transcripts (a prompt and 128 greedy float32 tokens each): the
max and mean absolute difference and the fraction of positions whose argmax agrees.

Both run in the same process on the same machine, one after the other, greedy, with no EOS stop. Compile time is
reported apart (the first call); tokens/s is the best of --repeats timed calls. A last table times int8 and float32
again with their calls alternated (best of --repeats each), since this kind of machine has slow spells that can
fall on one row and not the other. The roofline is the memory-bandwidth
bound of a decode step: (weight bytes + KV-cache bytes read per step) / measured copy bandwidth.
Writes results/bench_decode.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def copy_bandwidth(n_bytes=512 << 20, repeats=5) -> float:
    """Bytes per second of a large memcpy (read + write counted)."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--dtype", nargs="*", default=["float32", "bfloat16", "int8"],
                    choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", default="results/bench_decode.json")
    args = ap.parse_args()

    import torch
    import rss_jax as rj
    from rss_jax.decoding.common import encode_prompts
    from rss_jax.report import machine, table, write_json

    torch.set_num_threads(os.cpu_count())
    bw = copy_bandwidth()
    print(f"machine: {machine()}; copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    hf_models = {}
    ours_by = {}
    quality = {}
    lms = {}
    for dtype in args.dtype:
        lm = rj.load("smollm2-135m-instruct", dtype="bfloat16" if dtype == "bfloat16" else "float32",
                     quantize="int8" if dtype == "int8" else None)
        lms[dtype] = lm
        ids = encode_prompts(lm, [PROMPT])[0]
        if dtype == "int8":
            quality = int8_quality(rj, lm, ids, args.new_tokens)
            print(f"int8 vs float32 logits on {quality['transcripts']} chat transcripts ({quality['positions']} "
                  f"positions): max abs difference {quality['max_abs_logit_error']:.3f}, mean "
                  f"{quality['mean_abs_logit_error']:.4f}; argmax agreement {quality['argmax_agreement']:.4f} "
                  f"(each: {', '.join(f'{a:.3f}' for a in quality['argmax_agreement_each'])})", flush=True)
        cfg = lm.config
        weight_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in lm.params().values())
        for b in args.batch:
            prompts = [ids] * b
            out = rj.generate(lm, prompts, max_new_tokens=args.new_tokens, temperature=0.0, eos=[])
            compile_s = out.stats["compile_s"]
            ours = max(rj.generate(lm, prompts, max_new_tokens=args.new_tokens, temperature=0.0, eos=[])
                       .stats["tokens_per_s"] for _ in range(args.repeats))
            # KV bytes read per step: our loop attends over the whole static cache (bucket + new tokens)
            from rss_jax.decoding.common import bucket
            ctx = bucket(len(ids)) + args.new_tokens
            kv_bytes = 2 * cfg.num_layers * b * ctx * cfg.num_kv_heads * cfg.head_dim * np.dtype(
                "float16" if dtype == "bfloat16" else "float32").itemsize
            roofline = bw / (weight_bytes + kv_bytes) * b
            ours_by[dtype, b] = ours
            row = {"dtype": dtype, "batch": b, "rss_jax tok/s": ours, "compile s": compile_s,
                   "roofline tok/s": roofline, "of roofline": ours / roofline}
            if dtype == "int8" and ("float32", b) in ours_by:
                row["vs float32"] = ours / ours_by["float32", b]
            if not args.no_hf:
                hf_dtype = "bfloat16" if dtype == "bfloat16" else "float32"  # int8 rows: against float32
                if hf_dtype not in hf_models:
                    from transformers import AutoModelForCausalLM
                    from rss_jax.loading import resolve_builtin
                    path = resolve_builtin("smollm2-135m-instruct")
                    hf_models[hf_dtype] = AutoModelForCausalLM.from_pretrained(
                        os.path.dirname(path), gguf_file=os.path.basename(path),
                        dtype=torch.float32 if hf_dtype == "float32" else torch.bfloat16).eval()
                m = hf_models[hf_dtype]
                x = torch.tensor(prompts)
                best = float("inf")
                with torch.no_grad():
                    m.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        m.generate(x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0)
                        best = min(best, time.perf_counter() - t)
                hf = b * args.new_tokens / best
                row.update({"transformers tok/s": hf, "speed-up": ours / hf})
            rows.append(row)
            print(table([row]), flush=True)
    # int8 against float32 once more with the calls alternated, so that a slow spell of the machine hits both
    paired = []
    if "float32" in lms and "int8" in lms:
        for b in args.batch:
            best = dict.fromkeys(("float32", "int8"), 0.0)
            for _ in range(args.repeats):
                for dtype in best:
                    out = rj.generate(lms[dtype], [ids] * b, max_new_tokens=args.new_tokens, temperature=0.0, eos=[])
                    best[dtype] = max(best[dtype], out.stats["tokens_per_s"])
            paired.append({"batch": b, "float32 tok/s": best["float32"], "int8 tok/s": best["int8"],
                           "int8 vs float32": best["int8"] / best["float32"]})
    print()
    print(table(rows, title=f"greedy decoding, {args.new_tokens} new tokens, {machine()}"))
    if paired:
        print(table(paired, title=f"int8 against float32, calls alternated, best of {args.repeats} each"))
    write_json(args.out, {"machine": machine(), "copy_bandwidth_GBps": bw / 1e9, "new_tokens": args.new_tokens,
                          "rows": rows, "int8_vs_float32_alternated": paired or None, "int8_quality": quality or None,
                          "command": " ".join(sys.argv)})


QUALITY_PROMPTS = [PROMPT, "Give me three tips for a good night's sleep.", "Explain how a rainbow forms.",
                   "Describe your ideal weekend.", "What should I cook for dinner tonight?"]


def int8_quality(rj, q, ids, new_tokens) -> dict:
    """The int8 model's logits against float32's on chat transcripts: each of QUALITY_PROMPTS as a chat prompt with
    float32's greedy reply of `new_tokens` tokens, teacher-forced through both models."""
    from rss_jax.decoding.common import encode_prompts
    f32 = rj.load("smollm2-135m-instruct")
    agree, errors, positions = [], [], 0
    for prompt in QUALITY_PROMPTS:
        p = encode_prompts(f32, [prompt])[0]
        reply = rj.generate(f32, [p], max_new_tokens=new_tokens, temperature=0.0, eos=[]).tokens[0].tolist()
        full = [list(p) + reply]
        a, b = np.asarray(f32.logits(full))[0], np.asarray(q.logits(full))[0]
        agree.append(float((a.argmax(-1) == b.argmax(-1)).mean()))
        errors.append(np.abs(a - b))
        positions += len(full[0])
    err = np.concatenate([e.ravel() for e in errors])
    weights = [e.shape[0] for e in errors]
    return {"transcripts": len(QUALITY_PROMPTS), "positions": positions, "max_abs_logit_error": float(err.max()),
            "mean_abs_logit_error": float(err.mean()), "argmax_agreement_each": agree,
            "argmax_agreement": float(np.average(agree, weights=weights))}

if __name__ == "__main__":
    main()
