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

import tqdm  # noqa: E402

import rss_jax  # noqa: E402
import training  # noqa: E402
from rss_jax.report import write_json  # noqa: E402

TOPICS = ("a rainy day", "learning to cook", "the ocean", "a job interview", "your favourite book", "space travel",
          "a city at night", "gardening", "friendship", "a mountain hike", "coffee", "a school trip", "music",
          "winter", "a lost cat", "the internet", "a small village", "running a marathon", "painting", "trains")
FORMS = ("Write a short story about {}.", "Give three tips about {}.", "Describe {} in a few sentences.",
         "Write a short poem about {}.", "Explain to a child what is special about {}.",
         "Write a friendly email to a colleague about {}.", "What are the pros and cons of {}?",
         "Write a product review that mentions {}.")
# --more-prompts adds these (a wider mix of everyday chat requests)
MORE_TOPICS = ("homework", "a birthday party", "climate change", "a new phone", "learning a language", "a broken bike",
               "the history of bread", "a noisy neighbour", "moving to a new city", "healthy breakfasts", "chess",
               "a summer holiday", "electric cars", "a first day at work", "dogs", "saving money", "the moon",
               "a football match", "volunteering", "old photographs")
MORE_FORMS = ("Summarise in two sentences why people care about {}.", "Answer briefly: what should I know about {}?",
              "Write a tweet about {}.", "List five words that come to mind for {}.",
              "Write a dialogue between two friends about {}.", "How would you explain {} to your grandmother?")


def prompts(more: bool = False) -> list[str]:
    """The instruction set: 160 prompts, or 160 + 400 with `more` (the original 160 first)."""
    base = [f.format(t) for t in TOPICS for f in FORMS]
    if not more:
        return base
    extra = [f.format(t) for t in MORE_TOPICS for f in FORMS + MORE_FORMS]
    extra += [f.format(t) for t in TOPICS for f in MORE_FORMS]
    return base + extra


def generate(lm, texts, new_tokens, seed, batch=16, responses=1):
    """The target's own responses (temperature 1, stopping at its EOS) as prompt/response id records; `responses`
    samples per prompt (different seeds), grouped by prompt."""
    out = [[] for _ in texts]
    jobs = [(i, r) for r in range(responses) for i in range(len(texts))]
    for s in tqdm.trange(0, len(jobs), batch, desc="target samples", unit="batch"):
        part = jobs[s:s + batch]
        res = rss_jax.generate(lm, [texts[i] for i, _ in part], max_new_tokens=new_tokens, temperature=1.0,
                               seed=seed + 7919 * part[0][1] + s)
        for (i, _), ids, row, n in zip(part, res.prompt_ids, res.tokens, res.lengths):
            out[i].append({"prompt_ids": ids, "response_ids": row[:n].tolist()})
    return out


def cached_records(lm, texts, a):
    """Sampled records per prompt, read from / written to --data-cache (JSON) so reruns skip the sampling."""
    key = {"model": a.model, "new_tokens": a.new_tokens, "seed": a.seed, "responses": a.responses_per_prompt,
           "texts": texts}
    if a.data_cache and os.path.exists(a.data_cache):
        with open(a.data_cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            print(f"read the target's samples from {a.data_cache}", flush=True)
            return cached["records"]
        print(f"{a.data_cache} was made with other settings; sampling again", flush=True)
    print(f"sampling {a.new_tokens} tokens x {a.responses_per_prompt} for {len(texts)} prompts from the target ...",
          flush=True)
    records = generate(lm, texts, a.new_tokens, a.seed, batch=a.sample_batch, responses=a.responses_per_prompt)
    if a.data_cache:
        write_json(a.data_cache, {"key": key, "records": records})
    return records


_FWD = jax.jit(training.model_logits, static_argnums=0)  # one wrapper, so every acceptance() call reuses its compiles


def acceptance(target, draft, data: training.Dataset, batch=8) -> float:
    total, count = 0.0, 0.0
    fwd = _FWD
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
    ap.add_argument("--more-prompts", action="store_true", help="560 instructions instead of 160")
    ap.add_argument("--responses-per-prompt", type=int, default=1)
    ap.add_argument("--sample-batch", type=int, default=16, help="rows per sampling call")
    ap.add_argument("--data-cache", default=None, metavar="FILE",
                    help="JSON file for the target's samples: reused when it matches the settings, else written")
    ap.add_argument("--head-vocab", type=int, default=0, metavar="N",
                    help="trim the draft's output head to N tokens (training.draft_vocabulary of the training "
                    "responses, + EOS); 0 = full")
    ap.add_argument("--init", default=None, metavar="DIR", help="start from this draft instead of --layers")
    ap.add_argument("--samples-only", action="store_true", help="only sample (fill --data-cache) and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "distill_draft.json"))
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="also write the distilled draft here (an rss_jax Orbax folder for --draft of the benchmarks)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    target = rss_jax.load(a.model)
    texts = prompts(a.more_prompts)
    rng = np.random.default_rng(a.seed)
    rng.shuffle(texts)
    records = cached_records(target, texts, a)
    if a.samples_only:
        return
    # held out by prompt: the first --held-out instructions of the 160-prompt set shuffled with --seed (the same
    # held-out set whatever --more-prompts says, so drafts of both runs are measured on unseen instructions);
    # one response each is enough to measure
    base = prompts(False)
    np.random.default_rng(a.seed).shuffle(base)
    held_texts = set(base[:a.held_out])
    train_recs = [r for t, per in zip(texts, records) if t not in held_texts for r in per]
    held = [per[0] for t, per in zip(texts, records) if t in held_texts]
    if a.init:
        draft = rss_jax.load(a.init)
        print(f"starting from {a.init}", flush=True)
    else:
        draft = training.make_draft(target, a.layers)
    coverage = None
    if a.head_vocab:
        ids = training.draft_vocabulary([r["response_ids"] for r in train_recs], a.head_vocab)
        draft = training.trim_vocab(draft, ids)
        keep = set(draft.config.head_token_ids)
        held_tokens = [t for r in held for t in r["response_ids"]]
        coverage = sum(t in keep for t in held_tokens) / max(len(held_tokens), 1)
        print(f"draft head trimmed to {len(keep)} tokens: they cover {coverage:.4f} of the held-out response "
              "tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, recs in (("train", train_recs), ("held", held)):
            paths[name] = os.path.join(tmp, name + ".jsonl")
            with open(paths[name], "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        held_data = training.build_dataset(paths["held"], "sft", target.tokenizer, target.config.vocab_size)
        # training-set acceptance on a fixed sample of at most 96 examples (enough to show over-fitting)
        sub = os.path.join(tmp, "train_sample.jsonl")
        with open(sub, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in train_recs[:: max(1, len(train_recs) // 96)][:96])
        train_sample = training.build_dataset(sub, "sft", target.tokenizer, target.config.vocab_size)
        before = acceptance(target, draft, held_data)
        before_train = acceptance(target, draft, train_sample)
        print(f"draft layers {a.layers}: acceptance before distillation {before:.4f} (held out)", flush=True)
        res = training.train(training.TrainConfig(
            mode="distill", policy=draft, teacher=target, data=paths["train"], output=os.path.join(tmp, "run"),
            steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, seed=a.seed,
            distill_loss=a.loss, export=False))
        after = acceptance(target, res.lm, held_data)
        if a.save:
            res.lm.save(a.save, overwrite=True)
            print(f"wrote the distilled draft to {a.save}", flush=True)
        after_train = acceptance(target, res.lm, train_sample)
    print(f"acceptance after {a.steps} steps of {a.loss} distillation: {after:.4f} held out "
          f"(train {before_train:.4f} -> {after_train:.4f}); {time.perf_counter() - t0:.0f} s in all")
    record = {"command": " ".join(["python", *sys.argv]), "settings": vars(a),
              "draft_layers": training.parse_layers(a.layers), "train_examples": len(train_recs),
              "head_vocab": len(draft.config.head_token_ids) or None, "held_out_head_coverage": coverage,
              "held_out_examples": len(held), "acceptance_before": before, "acceptance_after": after,
              "train_acceptance_before": before_train, "train_acceptance_after": after_train,
              "first_loss": res.metrics[0]["loss"], "last_loss": res.metrics[-1]["loss"],
              "wall_s": time.perf_counter() - t0}
    write_json(a.out, record)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
