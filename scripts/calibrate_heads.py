"""Calibrate the proposal temperature of a trained SFT head and its aligned (DPO) copy, and store it in the heads.

A head distilled with KL(p || q) tends to be under-confident: it spreads mass to cover the target's. Drafting from a
slightly cooler proposal then overlaps the target more, and any proposal keeps SD and exact SSS exact (q in the
acceptance ratio is what the drafts were sampled from). This script measures, in closed form on the held-out
responses (`eval.jsonl` in --data, the file train_heads.py evaluates on), the per-offset acceptance at each
proposal temperature scale * T:

* the SFT head as SD's proposal, against the target (`training.heads.evaluate_acceptance`);
* the aligned head as exact SSS's proposal, against p~ = softmax((l_ref + l_r - l_sft) / T) built from both heads on
  the target's true features (`training.heads.evaluate_shifted_acceptance`).

Each head gets the scale with the highest mean alpha_1..alpha_--steps, written into its folder as
`draft_temperature_scale` (the weights are rewritten unchanged, in --dtype); `rj.generate` then drafts at
scale * temperature unless draft_temperature is given. --dry-run only measures.

    .venv/bin/python scripts/calibrate_heads.py --heads rss_jax/assets/heads --out results/calibrate_heads.json
    .venv/bin/python scripts/calibrate_heads.py --sft runs/head-sft/final --aligned runs/head-dpo/final --model M \
        --data DIR --eval-file heldout.jsonl   # your own heads (DIR: sample_target.py's output folder)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default=os.path.join(ROOT, "rss_jax", "assets", "heads"),
                   help="folder holding smollm2-135m-instruct-sft and smollm2-135m-instruct-aligned (train_heads.py's "
                   "--save)")
    p.add_argument("--sft", default=None, help="the SFT head's folder (default: the one in --heads)")
    p.add_argument("--aligned", default=None, help="the aligned head's folder (default: the one in --heads)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=os.path.join(os.environ.get("RSS_JAX_CACHE", os.path.expanduser(
        "~/.cache/rss_jax")), "head_data"), help="the folder of scripts/train_heads.py's samples and feature caches")
    p.add_argument("--eval-file", default="eval.jsonl", help="held-out sample file in --data")
    p.add_argument("--width", type=int, default=176, help="feature-cache width (train_heads.py's --width)")
    p.add_argument("--scales", nargs="+", type=float, default=[0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
    p.add_argument("--steps", type=int, default=3, help="drafting offsets whose mean acceptance is maximised")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision")
    p.add_argument("--dry-run", action="store_true", help="measure only; leave the heads as they are")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "calibrate_heads.json"))
    a = p.parse_args()

    import rss_jax
    from rss_jax.report import machine, write_json
    from train_heads import features, read_records
    from training import heads as th

    t_start = time.time()
    paths = {role: getattr(a, role) or os.path.join(a.heads, f"smollm2-135m-instruct-{role}")
             for role in ("sft", "aligned")}
    for role, path in paths.items():
        if not rss_jax.heads.is_head_folder(path):
            raise SystemExit(f"calibrate_heads.py: error: {path} is not a feature-head folder; give --heads the "
                             f"folder that train_heads.py saved both heads into (its --save), or --{role} the head")
    eval_path = os.path.join(a.data, a.eval_file)
    if not os.path.exists(eval_path):
        raise SystemExit(f"calibrate_heads.py: error: no sample file {eval_path}; make it with "
                         "scripts/sample_target.py (see `make drafts`)")
    lm = rss_jax.load(a.model)
    sft, aligned = (rss_jax.load(paths[r]) for r in ("sft", "aligned"))
    tag = "-".join(map(str, sft.config.taps))
    stem = os.path.splitext(a.eval_file)[0]
    ev = features(lm, read_records(eval_path), sft.config.taps, a.temperature,
                  os.path.join(a.data, f"{stem}_feat_{tag}.npz"), a.width)
    report = {"command": "python scripts/calibrate_heads.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "eval_responses": len(ev), "temperature": a.temperature, "steps": a.steps, "heads": {}}
    for role, head, against in (("sft", sft, None), ("aligned", aligned, sft)):
        t0 = time.time()
        best, rows = th.calibrate_proposal(lm, head, ev, scales=tuple(a.scales), steps=a.steps,
                                           temperature=a.temperature, sft=against)
        print(f"{role} head ({'against p~ of exact SSS' if against is not None else 'against the target'}):")
        for r in rows:
            mark = "  <- best" if r["scale"] == best else ""
            print(f"  scale {r['scale']:.3f} (T {r['draft_temperature']:.3f}): alpha "
                  + " / ".join(f"{x:.4f}" for x in r["alpha"]) + f"  mean {r['mean_alpha']:.4f}{mark}", flush=True)
        report["heads"][role] = {"path": paths[role], "against": "p_tilde" if against is not None else "target",
                                 "previous_scale": head.draft_temperature_scale, "best_scale": best, "rows": rows,
                                 "seconds": time.time() - t0}
    if not a.dry_run:
        # written after both measurements: the aligned head's p~ uses the SFT head's logits, which the scale
        # does not change (it only re-tempers the proposal), so the order does not matter for the numbers
        for role, head in (("sft", sft), ("aligned", aligned)):
            dataclasses.replace(head, draft_temperature_scale=report["heads"][role]["best_scale"]).save(
                paths[role], overwrite=True, dtype=a.dtype)
            print(f"wrote draft_temperature_scale {report['heads'][role]['best_scale']} into {paths[role]}")
    report["total_s"] = time.time() - t_start
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
