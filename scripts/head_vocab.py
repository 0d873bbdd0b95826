"""Closed-form acceptance of a trained feature-draft head on chosen sample files, and with wider draft vocabularies.

A head owns no vocabulary weights: its hidden state is scored against the target's output rows W[D]. So the same
trained head can be scored over a larger D with no retraining, and its closed-form per-offset acceptance measured as
train_heads.py does. D grows by the most frequent tokens of the training responses (--train-files) that are not in
it yet; the last size may be the full vocabulary (--full). --eval-files names the sample files to measure on (in
--data; features are computed once and cached beside them, as train_heads.py does): the held-out topics by default,
or e.g. training responses, or fresh responses to training prompts (scripts/sample_target.py), to tell a gap of
topics from one of memorised samples. --draft-temperatures scores the proposal at other temperatures (the
engine's draft_temperature; the target stays at --temperature): a head that is over- or under-confident accepts
more with a hotter or cooler proposal.

    .venv/bin/python scripts/head_vocab.py --sizes 8192 12288 16384 --out results/head_vocab.json
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

import numpy as np  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", default="smollm2-135m-instruct-head-sft")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=os.path.join(os.environ.get("RSS_JAX_CACHE", os.path.expanduser(
        "~/.cache/rss_jax")), "head_data"), help="the folder of scripts/train_heads.py's samples and feature caches")
    p.add_argument("--train-files", nargs="+", default=["train_extra.jsonl"],
                   help="sample files (in --data) whose response tokens rank the added vocabulary")
    p.add_argument("--eval-files", nargs="+", default=["eval.jsonl"],
                   help="sample files (in --data) to measure on; FILE:N uses its first N responses")
    p.add_argument("--width", type=int, default=176, help="feature-cache width (train_heads.py's --width)")
    p.add_argument("--sizes", nargs="+", type=int, default=[8192, 12288, 16384])
    p.add_argument("--full", action="store_true", help="also score over the whole vocabulary")
    p.add_argument("--steps", type=int, default=3, help="drafting offsets to measure")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--draft-temperatures", nargs="+", type=float, default=[None],
                   help="proposal temperatures to score (default: --temperature's)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "head_vocab.json"))
    a = p.parse_args()

    from flax import nnx

    import rss_jax
    from rss_jax.heads import flatten, from_flat
    from rss_jax.report import write_json
    from training import heads as th
    from training.draft import frequent_token_ids

    lm = rss_jax.load(a.model)
    head = rss_jax.load(a.head)
    from train_heads import features, read_records
    taps = "-".join(map(str, head.config.taps))
    sets = {}
    for spec in a.eval_files:
        name, _, n = spec.partition(":")
        path = os.path.join(a.data, name)
        if not os.path.exists(path):
            raise SystemExit(f"head_vocab.py: error: no sample file {path}; make it with scripts/sample_target.py "
                             "(see `make drafts`)")
        recs = read_records(path)[: int(n) if n else None]
        stem = os.path.splitext(name)[0]
        sets[spec] = features(lm, recs, head.config.taps, a.temperature,
                              os.path.join(a.data, f"{stem}_feat_{taps}.npz"), a.width)
    responses = [r["response_ids"] for name in a.train_files for r in read_records(os.path.join(a.data, name))]
    base = list(head.config.token_ids)
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(head.state)).items()}
    sizes = sorted(set(a.sizes)) + ([lm.config.vocab_size] if a.full else [])
    wide = {}  # size -> (the head scored over that vocabulary, its token ids): the same for every sample file
    for size in sizes:
        if size >= lm.config.vocab_size:
            ids = list(range(lm.config.vocab_size))
        else:
            ids = sorted(set(frequent_token_ids(responses, max(size, len(base)), always=base)))
        wide[size] = (from_flat(dataclasses.replace(head.config, token_ids=tuple(ids)), flat), ids)
    rows = []
    print(f"{a.head}: trained with |D| = {len(base)}")
    print(f"{'samples':>22s} {'n':>4s} {'asked':>7s} {'|D|':>7s} {'coverage':>8s} "
          + " ".join(f"{'a_' + str(i + 1):>7s}" for i in range(a.steps)))
    for spec, ev in sets.items():
        held = np.concatenate([ev.tokens[i, ev.prompt_lens[i]: ev.lengths[i]] for i in range(len(ev))])
        for size, (scored, ids) in wide.items():
            for dt in a.draft_temperatures:
                t0 = time.perf_counter()
                alpha = th.evaluate_acceptance(lm, scored, ev, steps=a.steps, temperature=a.temperature,
                                               draft_temperature=dt)
                cover = float(np.isin(held, ids).mean())
                rows.append(dict(samples=spec, responses=len(ev), asked=size, vocab=len(ids),
                                 draft_temperature=a.temperature if dt is None else dt, eval_token_coverage=cover,
                                 alpha=alpha, seconds=time.perf_counter() - t0))
                print(f"{spec:>22s} {len(ev):4d} {size:7d} {len(ids):7d} {cover:8.3f} "
                      + (f"draft T {dt:.3f} " if dt is not None else "")
                      + " ".join(f"{x:7.4f}" for x in alpha), flush=True)
    write_json(a.out, dict(head=a.head, trained_vocab=len(base), train_files=a.train_files, rows=rows,
                           command="python scripts/head_vocab.py " + " ".join(sys.argv[1:])))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
