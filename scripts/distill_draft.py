"""Distil a layer-truncated SmolLM2-135M-Instruct draft toward the full model and measure speculative acceptance.

1. The full model (target) samples responses to a set of instructions (chat template, temperature 1), so the
   training and held-out text is what speculative decoding would see.
2. The draft = `training.make_draft(target, layers)` (embeddings, head and a layer subset of the target).
3. Acceptance alpha = mean over held-out response positions of sum_v min(p(v), q(v)) (p: target, q: draft next-token
   distributions) — the expected per-token acceptance of speculative sampling — before and after distillation.

    python scripts/distill_draft.py --layers 0-5,29 --steps 60     # writes results/distill_draft.json
"""
from __future__ import annotations

import argparse
import functools
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
from flax import nnx  # noqa: E402

import rss_jax  # noqa: E402
import training  # noqa: E402
from rss_jax.cache import init_cache  # noqa: E402

TOPICS = ("a rainy day", "learning to cook", "the ocean", "a job interview", "your favourite book", "space travel",
          "a city at night", "gardening", "friendship", "a mountain hike", "coffee", "a school trip", "music",
          "winter", "a lost cat", "the internet", "a small village", "running a marathon", "painting", "trains")
FORMS = ("Write a short story about {}.", "Give three tips about {}.", "Describe {} in a few sentences.",
         "Write a short poem about {}.")


def prompts() -> list[str]:
    return [f.format(t) for t in TOPICS for f in FORMS]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sample(graphdef, state, tokens, lengths, key, new_tokens):
    """tokens [B, P] right-padded prompts with lengths [B] -> sampled continuations [B, new_tokens]."""
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cache = init_cache(model.config, b, p + new_tokens)
    logits, cache = model(tokens, cache=cache, lengths=jnp.zeros((b,), jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def body(carry, k):
        last, cache, lengths = carry
        tok = jax.random.categorical(k, last).astype(jnp.int32)
        logits, cache = model(tok[:, None], cache=cache, lengths=lengths)
        return (logits[:, 0], cache, lengths + 1), tok

    _, toks = jax.lax.scan(body, (last, cache, lengths), jax.random.split(key, new_tokens))
    return toks.T


def generate(lm, texts, new_tokens, seed, batch=16):
    tok = lm.tokenizer
    eos = set(lm.eos_token_ids)
    out = []
    for s in range(0, len(texts), batch):
        chunk = texts[s:s + batch]
        ids = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for t in chunk]
        width = -(-max(map(len, ids)) // 16) * 16
        arr = np.zeros((len(chunk), width), np.int32)
        for i, x in enumerate(ids):
            arr[i, :len(x)] = x
        gen = np.asarray(_sample(lm.graphdef, lm.state, jnp.asarray(arr), jnp.asarray([len(x) for x in ids]),
                                 jax.random.key(seed + s), new_tokens))
        for x, g in zip(ids, gen):
            resp = []
            for t in g.tolist():
                resp.append(t)
                if t in eos:
                    break
            out.append({"prompt_ids": x, "response_ids": resp})
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
