"""DPO training throughput: rss_jax's trainer (JAX/XLA) against TRL's DPOTrainer (PyTorch), CPU, one run.

Both train the same model (default: SmolLM2-135M-Instruct, dequantised from the built-in GGUF by each library's own
loader) on the same synthetic preference pairs (conversational prompt/chosen/rejected, each side's chat template),
with the same batch, sequence cap, optimizer (AdamW, constant learning rate, no warm-up) and an on-the-fly frozen
reference (TRL's default; ours with --reference-mode online). Each framework runs in its own subprocess with the same
thread budget. tokens/s = non-padding tokens of the chosen and rejected sequences (prompt included) per second of
optimizer steps, over the steps after the first (which includes JAX compilation / PyTorch warm-up).

    python scripts/bench_train.py                       # prints a table, writes results/bench_train.json
    python scripts/bench_train.py --steps 4 --batch-size 2 --max-length 128

Needs `trl` (pip install trl; the `bench` extra).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the movie was good bad great terrible plot actor scene music story film ending slow fast funny sad "
         "really quite very not and but with a an of to in it this that i we they loved hated enjoyed").split()


def make_pairs(n: int, seed: int, prompt_words: int, response_words: int) -> list[dict]:
    import random
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": "Review this film: " + sentence(prompt_words),
             "chosen": sentence(response_words) + " great", "rejected": sentence(response_words) + " terrible"}
            for _ in range(n)]


def run_ours(a) -> dict:
    sys.path.insert(0, ROOT)
    import rss_jax
    import training
    t0 = time.perf_counter()
    policy = rss_jax.load(a.model, dtype="float32")
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for r in json.load(open(a.data)):
                f.write(json.dumps(r) + "\n")
        res = training.train(training.TrainConfig(
            mode="dpo", policy=policy, data=data, output=os.path.join(tmp, "run"), steps=a.steps,
            batch_size=a.batch_size, learning_rate=a.learning_rate, seed=0, beta=0.1, max_length=a.max_length,
            reference_mode="precompute" if a.precompute else "online", warmup_steps=0, min_lr_ratio=1.0,
            max_grad_norm=1.0, compute_dtype=a.compute_dtype, progress=False, export=False))
    steps = res.metrics[1:]
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in steps)
    wall = sum(m["step_time_s"] for m in steps)
    return {"framework": "rss_jax (JAX)", "tokens_per_s": tokens / wall, "step_s": wall / len(steps),
            "first_step_s": res.metrics[0]["step_time_s"], "tokens_per_step": tokens / len(steps),
            "load_s": load_s, "losses": [m["loss"] for m in res.metrics]}


def run_trl(a) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from rss_jax.loading import BUILTIN, resolve_builtin
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if a.model in BUILTIN:
        path = resolve_builtin(a.model)
        kw = dict(gguf_file=os.path.basename(path))
        folder = os.path.dirname(path)
    else:
        kw, folder = {}, a.model
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    if kw:  # the GGUF loader dequantises to float32 but leaves the model flagged as quantized, which Trainer refuses
        model.is_quantized, model.hf_quantizer = False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    load_s = time.perf_counter() - t0
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = json.load(open(a.data))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    times, tokens = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()
            self.n = trainer._total_train_tokens

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            tokens.append(trainer._total_train_tokens - self.n)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                        max_steps=a.steps, learning_rate=a.learning_rate, lr_scheduler_type="constant",
                        warmup_steps=0, beta=0.1, loss_type=["sigmoid"], max_length=a.max_length,
                        precompute_ref_log_probs=a.precompute, max_grad_norm=1.0, use_cpu=True, report_to="none",
                        logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
                        bf16=a.compute_dtype == "bfloat16", disable_tqdm=True)
        ref = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen initial policy, as TRL builds it
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    wall, n = sum(times[1:]), sum(tokens[1:])
    return {"framework": f"TRL {__import__('trl').__version__} (PyTorch {torch.__version__})",
            "tokens_per_s": n / wall, "step_s": wall / len(times[1:]), "first_step_s": times[0],
            "tokens_per_step": n / len(times[1:]), "load_s": load_s, "losses": losses}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per framework (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--precompute", action="store_true", help="precompute the reference log-probs (both frameworks)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_train.json"))
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    if a.only:
        import torch
        torch.set_num_threads(a.threads)
        res = run_ours(a) if a.only == "ours" else run_trl(a)
        print("RESULT " + json.dumps(res))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.json")
        json.dump(make_pairs(a.pairs, 0, 12, 24), open(data, "w"))
        for which in ("ours", "trl"):
            cmd = [sys.executable, os.path.abspath(__file__), "--only", which, "--data", data,
                   "--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--max-length", str(a.max_length), "--learning-rate", str(a.learning_rate),
                   "--compute-dtype", a.compute_dtype, "--threads", str(a.threads)] + (["--precompute"] if a.precompute else [])
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS=str(a.threads))
            print(f"running {which} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                raise SystemExit(f"{which} failed (exit {out.returncode})")
            results.append(json.loads(line[0][len("RESULT "):]))
    ours, trl = results
    print(f"\nDPO training on CPU ({platform.processor() or platform.machine()}, {a.threads} threads): {a.model}, "
          f"{a.batch_size} pairs/step, max length {a.max_length}, reference "
          f"{'precomputed' if a.precompute else 'on the fly'}, {a.compute_dtype}, {a.steps} steps (first untimed)")
    print(f"{'framework':44s} {'tokens/s':>9s} {'s/step':>8s} {'tokens/step':>11s} {'first step s':>12s}")
    for r in results:
        print(f"{r['framework']:44s} {r['tokens_per_s']:9.1f} {r['step_s']:8.2f} {r['tokens_per_step']:11.0f} "
              f"{r['first_step_s']:12.1f}")
    print(f"speed-up (ours / TRL): {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    record = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "settings": {k: v for k, v in vars(a).items() if k not in ("only", "data", "out")},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "results": results, "speedup": ours["tokens_per_s"] / trl["tokens_per_s"]}
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
