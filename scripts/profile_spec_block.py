"""Wall-clock per block (per step for AR and EFT) of the decode loops with the shipped heads, to compare with the
timed forwards of scripts/bench_speculative.py's cost model and find what else a block spends time on.

--drop-mean-c replaces the SSS loop's mean_c statistic (three tempered log-softmaxes and a logsumexp over the
[K+1, V] rows, for `stats["mean_c"]` only) by zeros, so the difference of two runs is that statistic's cost. Run
each variant in its own process (the compiled loops are cached per process).

    .venv/bin/python scripts/profile_spec_block.py ar sd eft sss
    .venv/bin/python scripts/profile_spec_block.py --drop-mean-c sss
    .venv/bin/python scripts/profile_spec_block.py --trace /tmp/trace sd sss   # where a block's time goes

All methods (and variants) run on every prompt in a rotating order, so the ratios between them (vs ar, vs eft)
come from interleaved calls: block times drift by 10% between runs minutes apart, and interleaving cancels that.
--out FILE writes the table as JSON.

--compare FIELD also runs each method with a switch of the engine's SpecConfig turned on, and prints both and their
ratio of ms per block: `full_vocab_verify` (SSS and EFT verify over the whole vocabulary, as before the engine
verified heads over their draft vocabulary D plus one column). `--compare int8_heads` alternates the float32 heads
with their int8 copies (`rj.load(..., quantize="int8")`) instead, and prints tokens per block too (acceptance may
move).

    .venv/bin/python scripts/profile_spec_block.py --compare full_vocab_verify --prompts 16 sss eft
    .venv/bin/python scripts/profile_spec_block.py --compare int8_heads --prompts 16 sd sss

--trace DIR also records one more call per method (the first prompt) with the JAX profiler (a Perfetto trace in
DIR/<method>) and prints the time per block of each kind of XLA operation in it (the name before the first dot:
ffi_call for the CPU matmul kernels, dot, fusions, copy, ...) and of the ten costliest single operations.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", choices=["ar", "sd", "eft", "sss"])
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts, each decoded alone")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--drop-mean-c", action="store_true")
    p.add_argument("--compare", choices=["full_vocab_verify", "int8_heads"], default=None,
                   help="also time each method with this SpecConfig switch on (or int8 heads), alternated per prompt")
    p.add_argument("--trace", default=None, metavar="DIR", help="also profile one call per method into DIR")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()

    import jax.numpy as jnp

    import rss_jax as rj
    from rss_jax.decoding import speculative
    from rss_jax.report import interleaved, machine, table, write_json
    if a.drop_mean_c:
        speculative.sampling.mean_c = lambda lt, lr, ls, t, shift=1.0: jnp.zeros(lt.shape[:-1], jnp.float32)
    lm = rj.load("smollm2-135m-instruct")
    sft, aligned = rj.load("smollm2-135m-instruct-head-sft"), rj.load("smollm2-135m-instruct-head-aligned")
    heads8 = None
    if a.compare == "int8_heads":
        heads8 = (rj.load("smollm2-135m-instruct-head-sft", quantize="int8"),
                  rj.load("smollm2-135m-instruct-head-aligned", quantize="int8"))
    with open(os.path.join(ROOT, "data", "prompts_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:a.prompts]
    common = dict(max_new_tokens=a.new_tokens, temperature=0.8, eos=[])

    def method_kw(method, s, al):
        return {"ar": {}, "sd": dict(draft=s, k=a.k), "sss": dict(draft=al, sft=s, k=a.k),
                "eft": dict(draft=al, sft=s)}[method]

    # every (method, variant) runs on every prompt, in a rotating order: drift over the run hits all alike
    configs = []  # (label, method, SpecConfig fields, generate kwargs)
    for method in a.methods:
        configs.append((method, method, {}, method_kw(method, sft, aligned)))
        if a.compare == "int8_heads" and method != "ar":
            configs.append((f"{method} (int8 heads)", method, {}, method_kw(method, *heads8)))
        elif a.compare and method != "ar" and (a.compare != "full_vocab_verify" or method in ("sss", "eft")):
            configs.append((f"{method} ({a.compare})", method, {a.compare: True}, method_kw(method, sft, aligned)))
    def run_one(config, i, q):
        _, method, extra, kw = config
        with spec_config_fields(speculative, extra):
            return rj.generate(lm, [q], method=method, seed=i, **kw, **common)

    # item 0 (the first prompt once more) compiles each config: not counted
    outs = {c[0]: o[1:] for c, o in zip(configs, interleaved([prompts[0]] + prompts, configs, run_one))}
    rows = []
    for label, method, extra, _ in configs:
        wall = sum(o.stats["wall_s"] for o in outs[label])
        new = sum(o.stats["new_tokens"] for o in outs[label])
        blocks = sum(o.stats.get("blocks", o.stats.get("steps", 0)) for o in outs[label])
        rows.append({"config": label + (" (mean_c dropped)" if a.drop_mean_c else ""), "tok/s": new / wall,
                     "ms per block": 1e3 * wall / max(blocks, 1), "tokens per block": new / max(blocks, 1)})
    by = {r["config"]: r for r in rows}
    for r in rows:
        if "ar" in by:
            r["vs ar"] = r["tok/s"] / by["ar"]["tok/s"]
        base = r["config"].split(" ")[0]
        if base != r["config"] and base in by:
            r["ms per block vs default"] = r["ms per block"] / by[base]["ms per block"]
        if base == "sss":  # against EFT with the same heads
            eft = by.get(r["config"].replace("sss", "eft", 1))
            if eft:
                r["vs eft"] = r["tok/s"] / eft["tok/s"]
    title = (f"batch 1, {len(prompts)} held-out prompts each decoded alone, {a.new_tokens} new tokens, T 0.8, K "
             f"{a.k}, no EOS stop, float32 target; configs alternated per prompt; {machine()}")
    print(table(rows, title=title), flush=True)
    if a.out:
        write_json(a.out, {"machine": machine(), "command": " ".join(sys.argv), "rows": rows})
    if a.trace:
        for label, method, extra, kw in configs:
            if label == method:
                trace(os.path.join(a.trace, method),
                      lambda: rj.generate(lm, prompts[:1], method=method, seed=0, **kw, **common))


@contextlib.contextmanager
def spec_config_fields(speculative, fields: dict):
    """Within the block, every SpecConfig the engine builds gets `fields` (static: their own compiled loop)."""
    original = speculative.SpecConfig
    if fields:
        speculative.SpecConfig = functools.partial(original, **fields)
    try:
        yield
    finally:
        speculative.SpecConfig = original


def trace(folder: str, call) -> None:
    """Profile one call; print per-block milliseconds by operation kind and of the costliest operations."""
    import jax
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        out = call()
    blocks = max(out.stats.get("blocks", out.stats.get("steps", 0)), 1)
    files = sorted(glob.glob(os.path.join(folder, "**", "*.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            continue
        per_op[name] += e.get("dur", 0) / 1e3 / blocks
        per_kind[name.split(".")[0]] += e.get("dur", 0) / 1e3 / blocks
    print(f"  trace ({folder}; {blocks} blocks, {1e3 * out.stats['wall_s'] / blocks:.2f} ms per block while "
          f"profiled): ms per block by operation kind")
    for name, ms in per_kind.most_common(8):
        print(f"    {ms:7.2f}  {name}")
    print("  costliest operations (ms per block)")
    for name, ms in per_op.most_common(10):
        print(f"    {ms:7.2f}  {name}")


if __name__ == "__main__":
    main()
