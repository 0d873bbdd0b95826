"""Distil a layer-truncated SmolLM2-135M-Instruct draft toward the full model and measure speculative acceptance.

1. The full model (target) samples responses to a set of instructions (chat template, temperature 1), so the
   training and held-out text is what speculative decoding would see.
2. The draft = `training.make_draft(target, layers)` (embeddings, head and a layer subset of the target).
3. Acceptance alpha = mean over held-out response positions of sum_v min(p(v), q(v)) (p: target, q: draft next-token
   distributions) — the expected per-token acceptance of speculative sampling — before and after distillation.

    python scripts/distill_draft.py --layers 0-5,29 --steps 60     # writes results/distill_draft.json
    python scripts/distill_draft.py --steps 150 --save drafts/smollm2-distilled   # keeps the draft for benchmarks
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rss_jax  # noqa: E402
import training  # noqa: E402

TOPICS = ("a rainy day", "learning to cook", "the ocean", "a job interview", "your favourite book", "space travel",
          "a city at night", "gardening", "friendship", "a mountain hike", "coffee", "a school trip", "music",
          "winter", "a lost cat", "the internet", "a small village", "running a marathon", "painting", "trains")
FORMS = ("Write a short story about {}.", "Give three tips about {}.", "Describe {} in a few sentences.",
         "Write a short poem about {}.", "Explain to a child what is special about {}.",
         "Write a friendly email to a colleague about {}.", "What are the pros and cons of {}?",
         "Write a product review that mentions {}.")


def prompts() -> list[str]:
    return [f.format(t) for t in TOPICS for f in FORMS]


def generate(lm, texts, new_tokens, seed, batch=16):
    """The target's own responses (temperature 1, stopping at its EOS) as prompt/response id records."""
    out = []
    for s in range(0, len(texts), batch):
        res = rss_jax.generate(lm, texts[s:s + batch], max_new_tokens=new_tokens, temperature=1.0, seed=seed + s)
        for ids, row, n in zip(res.prompt_ids, res.tokens, res.lengths):
            out.append({"prompt_ids": ids, "response_ids": row[:n].tolist()})
    return out


def acceptance(target, draft, data: training.Dataset, batch=8) -> float:
    total, count = 0.0, 0.0
    fwd = jax.jit(training.model_logits, static_argnums=0)
    for s in range(0, len(data), batch):
        toks = jnp.asarray(data.tokens[s:s + batch, 0])
        mask = jnp.asarray(data.loss_mask[s:s + batch, 0, 1:])
        p = fwd(target.graphdef, target.state, toks)[:, :-1]
        q = fwd(draft.graphdef, draft.state, toks)[:, :-1]
        n = float(mask.sum())
        total += float(training.acceptance(p, q, mask)) * n
        count += n
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="0-5,29", help="target layers kept by the draft")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--loss", choices=("kl", "tv"), default="kl")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=16, help="prompts kept out of training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "distill_draft.json"))
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="also write the distilled draft here (an rss_jax Orbax folder for --draft of the benchmarks)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    target = rss_jax.load(a.model)
    texts = prompts()
    rng = np.random.default_rng(a.seed)
    rng.shuffle(texts)
    print(f"sampling {a.new_tokens} tokens for {len(texts)} prompts from the target ...", flush=True)
    records = generate(target, texts, a.new_tokens, a.seed)
    train_recs, held = records[a.held_out:], records[:a.held_out]
    draft = training.make_draft(target, a.layers)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, recs in (("train", train_recs), ("held", held)):
            paths[name] = os.path.join(tmp, name + ".jsonl")
            with open(paths[name], "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        held_data = training.build_dataset(paths["held"], "sft", target.tokenizer, target.config.vocab_size)
        train_data = training.build_dataset(paths["train"], "sft", target.tokenizer, target.config.vocab_size)
        before = acceptance(target, draft, held_data)
        before_train = acceptance(target, draft, train_data)
        print(f"draft layers {a.layers}: acceptance before distillation {before:.4f} (held out)", flush=True)
        res = training.train(training.TrainConfig(
            mode="distill", policy=draft, teacher=target, data=paths["train"], output=os.path.join(tmp, "run"),
            steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, seed=a.seed,
            distill_loss=a.loss, export=False))
        after = acceptance(target, res.lm, held_data)
        if a.save:
            res.lm.save(a.save, overwrite=True)
            print(f"wrote the distilled draft to {a.save}", flush=True)
        after_train = acceptance(target, res.lm, train_data)
    print(f"acceptance after {a.steps} steps of {a.loss} distillation: {after:.4f} held out "
          f"(train {before_train:.4f} -> {after_train:.4f}); {time.perf_counter() - t0:.0f} s in all")
    record = {"command": " ".join(["python", *sys.argv]), "settings": vars(a),
              "draft_layers": training.parse_layers(a.layers), "train_examples": len(train_recs),
              "held_out_examples": len(held), "acceptance_before": before, "acceptance_after": after,
              "train_acceptance_before": before_train, "train_acceptance_after": after_train,
              "first_loss": res.metrics[0]["loss"], "last_loss": res.metrics[-1]["loss"],
              "wall_s": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
