"""Train the shipped feature-draft heads of SmolLM2-135M-Instruct: an SFT head distilled toward the target and an
aligned head (DPO on VADER-ranked pairs of the target's own responses, reference = the SFT head).

Inputs: the target's responses to data/prompts_train.jsonl (or the files --train-files names, e.g. the answers to
data/prompts_train_extra.jsonl) and data/prompts_eval.jsonl (scripts/sample_target.py; the evaluation prompts use
topics the training prompts never mention). The target's tapped features are computed
once and cached (.npz beside the samples). Per-offset acceptance alpha_i (closed form, teacher-forced on the
evaluation samples, fed-back features for i >= 2) is measured before and after, and written to the JSON report.

    python scripts/sample_target.py --prompts data/prompts_train.jsonl --responses 2 --out $D/train.jsonl
    python scripts/sample_target.py --prompts data/prompts_eval.jsonl --limit 120 --seed 1 --out $D/eval.jsonl
    python scripts/train_heads.py --data $D --save rss_jax/assets/heads     # D=~/.cache/rss_jax/head_data
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import rss_jax  # noqa: E402
from rss_jax.report import write_json  # noqa: E402
from training import heads as th  # noqa: E402
from training.draft import frequent_token_ids  # noqa: E402


def read_records(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows  # file order: responses added later come last


def features(lm, records, taps, temperature, path, width):
    """The FeatureSet of `records`, reusing the rows of the cache at `path` that hold the same token sequences (so
    adding responses only runs the target over the new ones)."""
    cached, where = None, {}
    if os.path.exists(path):
        cached = th.FeatureSet.load(path)
        if cached.meta.get("taps") == list(taps) and cached.tokens.shape[1] == width and \
                cached.meta.get("temperature") == temperature and cached.meta.get("target") == lm.source:
            where = {tuple(cached.tokens[i, :cached.lengths[i]].tolist()): i for i in range(len(cached))}
    seqs = [tuple(r["prompt_ids"] + r["response_ids"]) for r in records]
    missing = [j for j, s in enumerate(seqs) if s not in where]
    if not missing:
        print(f"read cached features {path}", flush=True)
        return cached.subset([where[s] for s in seqs])
    new = th.extract_features(lm, [records[j] for j in missing], taps, temperature, width=width, batch_size=8)
    if not where:  # nothing reusable: every record is new
        fs = new
    else:
        print(f"reused {len(records) - len(missing)} cached rows of {path}", flush=True)
        pos = {j: len(cached) + n for n, j in enumerate(missing)}  # rows of `new` follow the cached rows
        fs = th.FeatureSet.concat([cached, new]).subset([pos[j] if j in pos else where[s] for j, s in enumerate(seqs)])
    fs.save(path)
    return fs


def resumable(a, output: str) -> bool:
    """--resume continues a stage only where its run folder holds a checkpoint (the other stage may be new)."""
    from training import checkpoint as ckpt
    return bool(a.resume) and ckpt.latest_checkpoint(output) is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=os.path.join(os.path.expanduser("~"), ".cache", "rss_jax", "head_data"))
    ap.add_argument("--save", default=os.path.join(ROOT, "rss_jax", "assets", "heads"))
    ap.add_argument("--taps", default="2,15,29")
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--width", type=int, default=176)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--ttt-steps", type=int, default=3)
    ap.add_argument("--tv-weight", type=float, default=0.0)
    ap.add_argument("--feature-noise", type=float, default=0.0, help="SFT: uniform noise on the tapped features, "
                    "this fraction of each tap vector's RMS (EAGLE's augmentation; 0: none)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--init", default=None, help="start the SFT head from this head folder")
    ap.add_argument("--depth", type=int, default=None, help="decoder layers of the head (default 1); with --init, "
                    "layers are appended to the loaded head, starting as the identity (rss_jax.heads.deepen)")
    ap.add_argument("--skip-sft", action="store_true", help="use --init as the SFT head as it is")
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--dpo-learning-rate", type=float, default=1e-4)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--consistency", type=float, default=1.0)
    ap.add_argument("--min-gap", type=float, default=0.1, help="DPO pairs need this VADER gap")
    ap.add_argument("--train-files", default="train.jsonl",
                    help="comma-separated sample files under --data to train on (scripts/sample_target.py output); "
                    "each keeps its own feature cache <name>_feat_<taps>.npz")
    ap.add_argument("--run-name", default="run1", help="runs/<name>-sft and runs/<name>-dpo under --data hold the "
                    "metrics and checkpoints")
    ap.add_argument("--resume", action="store_true",
                    help="continue each stage (SFT, DPO) whose runs/<name>-<stage> folder holds a checkpoint from its "
                    "latest one, with the same flags; a stage without one starts fresh")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "train_heads.json"))
    a = ap.parse_args()
    t_start = time.time()
    taps = tuple(int(t) for t in a.taps.split(","))
    lm = rss_jax.load(a.model)
    tag = "-".join(map(str, taps))
    train_recs, parts = [], []
    names = [x.strip() for x in a.train_files.split(",") if x.strip()]
    if not names:
        raise SystemExit("train_heads.py: error: --train-files names no file; give e.g. --train-files train.jsonl")
    for n_file, name in enumerate(names):
        path = os.path.join(a.data, name)
        if not os.path.exists(path):
            raise SystemExit(f"train_heads.py: error: no sample file {path}; make it with scripts/sample_target.py "
                             "(see `make drafts`) or drop it from --train-files")
        recs = [dict(r, file=n_file) for r in read_records(path)]
        stem = os.path.splitext(name)[0]
        parts.append(features(lm, recs, taps, a.temperature, os.path.join(a.data, f"{stem}_feat_{tag}.npz"),
                              a.width))
        train_recs += recs
    fs = parts[0] if len(parts) == 1 else th.FeatureSet.concat(parts)
    del parts
    eval_recs = read_records(os.path.join(a.data, "eval.jsonl"))
    print(f"{len(train_recs)} training responses ({a.train_files}), {len(eval_recs)} evaluation responses",
          flush=True)
    ev = features(lm, eval_recs, taps, a.temperature, os.path.join(a.data, f"eval_feat_{tag}.npz"), a.width)
    report = {"model": a.model, "taps": list(taps), "vocab": a.vocab, "temperature": a.temperature,
              "train_files": a.train_files, "train_responses": len(train_recs), "eval_responses": len(eval_recs),
              "train_tokens": int(sum(len(r["response_ids"]) for r in train_recs)), "args": vars(a)}

    if a.init:
        head = rss_jax.load(a.init)
        if a.depth is not None:
            head = rss_jax.heads.deepen(head, a.depth)
    else:
        always = list(lm.eos_token_ids)
        # the most frequent response tokens (on these samples this covers more held-out text than
        # draft_vocabulary's half-frequency, half-lowest-id rule)
        ids = frequent_token_ids([r["response_ids"] for r in train_recs], a.vocab, always=always)
        head = rss_jax.heads.new_head(lm, taps=taps, token_ids=ids, warm_start=False, depth=a.depth or 1)
    ev_ids = set(head.config.token_ids)
    report["eval_token_coverage"] = float(np.mean([t in ev_ids for r in eval_recs for t in r["response_ids"]]))
    report["head_params"] = head.num_params
    sft = head
    if not a.skip_sft:
        report["alpha_before"] = th.evaluate_acceptance(lm, head, ev, steps=4, temperature=a.temperature)
        print("alpha before", report["alpha_before"], flush=True)
        cfg = th.HeadTrainConfig(steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate,
                                 warmup=min(50, a.steps // 10), ttt_steps=a.ttt_steps, temperature=a.temperature,
                                 tv_weight=a.tv_weight, feature_noise=a.feature_noise, eval_every=a.eval_every,
                                 output=os.path.join(a.data, "runs", f"{a.run_name}-sft"))
        cfg.resume = resumable(a, cfg.output)
        t0 = time.time()
        sft, log = th.train_head(lm, head, fs, cfg, eval_set=ev)
        report["sft_train_s"] = time.time() - t0
        report["sft_log"] = log
        sft.save(os.path.join(a.save, "smollm2-135m-instruct-sft"), overwrite=True, dtype="float16")
        sft = rss_jax.load(os.path.join(a.save, "smollm2-135m-instruct-sft"))
    report["alpha_sft"] = th.evaluate_acceptance(lm, sft, ev, steps=4, temperature=a.temperature)
    print("alpha sft (held out)", report["alpha_sft"], flush=True)
    write_json(a.out, report)

    # DPO pairs: the two responses of each training prompt, ranked by VADER
    if a.dpo_steps > 0:
        reward = rss_jax.rewards.as_reward("vader", lm.tokenizer)
        scores = np.asarray(reward.score([r["prompt_ids"] for r in train_recs],
                                         [r["response_ids"] for r in train_recs]), np.float32)
        by_prompt = {}
        for row, r in enumerate(train_recs):
            by_prompt.setdefault((r["file"], r["i"]), []).append(row)
        pairs = []
        for rows in by_prompt.values():
            rows = sorted(rows, key=lambda x: -scores[x])
            if len(rows) >= 2 and scores[rows[0]] - scores[rows[-1]] >= a.min_gap:
                pairs.append((rows[0], rows[-1]))
        pairs = np.asarray(pairs, np.int64)
        report["dpo_pairs"] = len(pairs)
        report["dpo_pair_gap"] = float(np.mean(scores[pairs[:, 0]] - scores[pairs[:, 1]]))
        print(f"{len(pairs)} DPO pairs, mean VADER gap {report['dpo_pair_gap']:.3f}", flush=True)
        cfg = th.HeadTrainConfig(steps=a.dpo_steps, batch_size=a.batch_size, learning_rate=a.dpo_learning_rate,
                                 warmup=min(20, a.dpo_steps // 10), ttt_steps=a.ttt_steps,
                                 temperature=a.temperature, beta=a.dpo_beta, consistency=a.consistency,
                                 output=os.path.join(a.data, "runs", f"{a.run_name}-dpo"))
        cfg.resume = resumable(a, cfg.output)
        t0 = time.time()
        aligned, log = th.train_head(lm, sft, fs, cfg, mode="dpo", reference=sft, pairs=pairs)
        report["dpo_train_s"] = time.time() - t0
        report["dpo_log"] = log
        aligned.save(os.path.join(a.save, "smollm2-135m-instruct-aligned"), overwrite=True, dtype="float16")
        aligned = rss_jax.load(os.path.join(a.save, "smollm2-135m-instruct-aligned"))
        report["alpha_aligned_vs_target"] = th.evaluate_acceptance(lm, aligned, ev, steps=4,
                                                                   temperature=a.temperature)
        print("alpha aligned vs target", report["alpha_aligned_vs_target"], flush=True)
    report["total_s"] = time.time() - t_start
    write_json(a.out, report)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_log") and k != "args"}, indent=1))


if __name__ == "__main__":
    main()
