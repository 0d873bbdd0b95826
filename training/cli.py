"""`rss-jax train sft|distill|dpo ...`: the trainer's command line.

`add_train_parser(subparsers)` registers the `train` command on an argparse sub-parser collection and
`run_train(args)` runs it (returns a process exit code). `python -m training train dpo ...` works the same way.
"""
from __future__ import annotations

import argparse
import json

from rss_jax.cli import NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, number

INT = number(int)

HELP = {
    "sft": "supervised fine-tuning: masked cross-entropy on the response tokens",
    "distill": "distillation toward a teacher's next-token distributions (KL or total variation)",
    "dpo": "direct preference optimisation against a frozen reference",
    "head-distill": "a feature-draft head (EAGLE-style, over the target's hidden states) distilled toward its "
                    "target with the multi-step training-time-test loss",
    "head-dpo": "DPO of a feature-draft head against the frozen SFT head (the aligned head for SSS)",
}


def _head_parser(p: argparse.ArgumentParser, mode: str):
    g = p.add_argument_group("run")
    g.add_argument("--target", default="smollm2-135m-instruct", help="the model the head drafts for")
    g.add_argument("--data", required=True, help="JSONL: prompt(_ids) + response(_ids) (head-distill: the "
                   "target's own samples, e.g. from scripts/sample_target.py) or prompt + chosen + rejected (head-dpo)")
    g.add_argument("--output", required=True, help="run folder: checkpoints/, metrics.jsonl, final/ (the head)")
    g.add_argument("--steps", type=POS_INT, required=True)
    g.add_argument("--batch-size", type=POS_INT, default=16, help="sequences per step (head-dpo: 2 x pairs)")
    g.add_argument("--learning-rate", type=POS_FLOAT, default=1e-3 if mode == "head-distill" else 1e-4)
    g.add_argument("--warmup-steps", type=NONNEG_INT, default=None, help="default: 10%% of --steps")
    g.add_argument("--seed", type=INT, default=0)
    g.add_argument("--ttt-steps", type=POS_INT, default=3, help="drafting steps in the multi-step loss")
    g.add_argument("--temperature", type=POS_FLOAT, default=0.8, help="the decoding temperature the head is fit at")
    g.add_argument("--max-length", type=number(int, 2), default=512)
    g.add_argument("--stop-after", type=POS_INT, default=None, metavar="M")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--save-every", type=NONNEG_INT, default=0, metavar="N")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    if mode == "head-distill":
        g.add_argument("--taps", default=None, help="target layers the head reads, e.g. '2,15,29' "
                       "(default: a low, a middle and a high layer)")
        g.add_argument("--vocab", type=NONNEG_INT, default=8192, help="draft vocabulary size (0 = the full vocabulary)")
        g.add_argument("--init", default=None, help="start from this head folder")
        g.add_argument("--depth", type=POS_INT, default=None, help="decoder layers of the head (default 1); with "
                       "--init, layers are appended to the loaded head, starting as the identity")
        g.add_argument("--tv-weight", type=NONNEG_FLOAT, default=0.0, help="weight of 1 - acceptance added to the KL")
        g.add_argument("--feature-noise", type=NONNEG_FLOAT, default=0.0, help="uniform noise on the tapped "
                       "features while training, this fraction of each tap vector's RMS (EAGLE's augmentation)")
        g.add_argument("--eval-data", default=None, help="held-out samples: per-offset acceptance at the end")
        g.add_argument("--eval-every", type=NONNEG_INT, default=0)
    else:
        g.add_argument("--sft", required=True, help="the SFT head: the starting point and the frozen reference")
        g.add_argument("--beta", type=POS_FLOAT, default=0.1)
        g.add_argument("--consistency", type=NONNEG_FLOAT, default=1.0,
                       help="weight of KL(step-1 || fed-back steps) that keeps multi-step drafting accurate")


def _common(p: argparse.ArgumentParser):
    g = p.add_argument_group("run")
    g.add_argument("--policy", required=True, help="model to train: HF folder, .gguf, rss_jax Orbax folder or built-in")
    g.add_argument("--data", required=True, help="JSONL training data (see training/data.py for the fields)")
    g.add_argument("--output", required=True, help="run folder: checkpoints/, metrics.jsonl, final/")
    g.add_argument("--steps", type=POS_INT, required=True, help="length of the run and of the learning-rate schedule")
    g.add_argument("--batch-size", type=POS_INT, default=4, help="examples (DPO: pairs) per microbatch")
    g.add_argument("--grad-accum", type=POS_INT, default=1, help="microbatches per optimizer step")
    g.add_argument("--learning-rate", type=POS_FLOAT, default=1e-5, help="peak learning rate")
    g.add_argument("--seed", type=INT, default=0, help="data order and PRNG seed")
    g.add_argument("--stop-after", type=POS_INT, default=None, metavar="M",
                   help="end after step M with a checkpoint, as an interruption would; --resume continues")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g.add_argument("--save-every", type=NONNEG_INT, default=0, metavar="N",
                   help="checkpoint every N steps (always at the last step run)")
    g.add_argument("--keep-checkpoints", type=NONNEG_INT, default=2, help="newest checkpoints kept (0 = all)")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="do not write <output>/final at the end of the run")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--mesh", default=None, metavar="AXES",
                   help="shard over a device mesh, e.g. 'data=4,tensor=2' or 'fsdp=8' (axes data, fsdp, tensor; data "
                   "takes the devices the others leave): weights and Adam state by their logical axes, each batch's "
                   "rows over data x fsdp (--batch-size must divide)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-process run: call jax.distributed.initialize first (auto-detected on TPU pods and "
                   "SLURM; elsewhere set RSS_JAX_COORDINATOR=host:port, RSS_JAX_NUM_PROCESSES, RSS_JAX_PROCESS_ID); "
                   "start the same command on every process")
    o = p.add_argument_group("optimisation")
    o.add_argument("--warmup-steps", type=NONNEG_INT, default=None,
                   help="linear warm-up steps (default: 10%% of --steps)")
    o.add_argument("--min-lr-ratio", type=number(float, 0, 1), default=0.1,
                   help="cosine decay floor as a fraction of the peak")
    o.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.0)
    o.add_argument("--max-grad-norm", type=NONNEG_FLOAT, default=1.0, help="global-norm clipping (0 = off)")
    o.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="forward dtype (master weights stay float32)")
    d = p.add_argument_group("data")
    d.add_argument("--max-length", type=number(int, 2), default=512, help="prompt + response tokens per sequence")
    d.add_argument("--no-chat-template", dest="chat", action="store_false",
                   help="tokenize text fields plainly instead of through the chat template")
    d.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    d.add_argument("--init-layers", default=None, metavar="SPEC",
                   help="start from a draft of the policy with these layers, e.g. '0-7,29' (make_draft)")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` (with sub-commands sft, distill, dpo) on an argparse sub-parser collection."""
    train = subparsers.add_parser("train", help="train a draft: SFT, distillation or DPO",
                                  description="Train a draft model (Flax NNX + optax, Orbax checkpoints).")
    sub = train.add_subparsers(dest="train_mode", metavar="{sft,distill,dpo,head-distill,head-dpo}")
    sub.required = True
    for mode in ("head-distill", "head-dpo"):
        _head_parser(sub.add_parser(mode, help=HELP[mode], description=HELP[mode]), mode)
    for mode in ("sft", "distill", "dpo"):
        p = sub.add_parser(mode, help=HELP[mode], description=HELP[mode])
        _common(p)
        if mode == "distill":
            p.add_argument("--teacher", required=True, help="the model whose distributions the policy learns")
            p.add_argument("--distill-loss", choices=("kl", "tv"), default="kl",
                           help="KL(teacher||policy) or total variation (1 - TV = speculative acceptance)")
            p.add_argument("--ce-weight", type=NONNEG_FLOAT, default=0.0, help="weight of the response cross-entropy added")
            p.add_argument("--head-vocab", type=POS_INT, default=None, metavar="N",
                           help="trim the student's output head to N tokens (training.draft_vocabulary: half the data's "
                           "most frequent response tokens, half the lowest ids, + EOS): a cheaper draft step")
        if mode == "dpo":
            p.add_argument("--reference", default=None, help="reference model (default: frozen copy of --policy)")
            p.add_argument("--beta", type=POS_FLOAT, default=0.1)
            p.add_argument("--loss-type", choices=("sigmoid", "ipo", "hinge"), default="sigmoid")
            p.add_argument("--label-smoothing", type=number(float, 0, 0.5), default=0.0)
            p.add_argument("--reference-mode", choices=("precompute", "online"), default="precompute",
                           help="reference log-probs in one pass before training, or inside every step")
    train.set_defaults(func=run_train)
    return train


def config_from_args(args):
    from training.trainer import TrainConfig
    mode = args.train_mode
    kw = dict(mode=mode, policy=args.policy, data=args.data, output=args.output, steps=args.steps,
              batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.learning_rate,
              seed=args.seed, stop_after=args.stop_after, resume=args.resume, save_every=args.save_every,
              keep_checkpoints=args.keep_checkpoints, export=args.export, progress=args.progress,
              warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
              max_grad_norm=args.max_grad_norm, compute_dtype=args.compute_dtype, max_length=args.max_length,
              chat=args.chat, shuffle=args.shuffle, init_layers=args.init_layers)
    if getattr(args, "mesh", None):
        from rss_jax.sharding import parse_mesh
        kw["mesh"] = parse_mesh(args.mesh)
    if mode == "distill":
        kw.update(teacher=args.teacher, distill_loss=args.distill_loss, ce_weight=args.ce_weight,
                  head_vocab=args.head_vocab)
    if mode == "dpo":
        kw.update(reference=args.reference, beta=args.beta, loss_type=args.loss_type,
                  label_smoothing=args.label_smoothing, reference_mode=args.reference_mode)
    return TrainConfig(**kw)


def _report(e: BaseException, args) -> int:
    """The command line's one error line (the problem and its fix) for an expected training failure; exit 2."""
    from rss_jax.cli import error_line, one_line
    line, _ = error_line(e, args)
    one_line(line)
    return 2


def run_train(args) -> int:
    """Run `train <mode>` from parsed arguments; prints a one-line JSON summary. Returns the exit code."""
    from rss_jax.loading.names import CheckpointError
    from rss_jax.models.config import ConfigError
    from training.checkpoint import CheckpointMismatch
    from training.data import DataError
    from training.trainer import train
    if args.train_mode.startswith("head-"):
        from training.heads import run_recipe
        try:
            print(json.dumps(run_recipe(args)))
        except (DataError, CheckpointMismatch, CheckpointError, ConfigError, FileNotFoundError, FileExistsError,
                FloatingPointError, ValueError) as e:
            return _report(e, args)
        return 0
    from rss_jax.sharding import ShardingError, initialize, is_main_process
    try:
        if getattr(args, "distributed", False):
            initialize()
        result = train(config_from_args(args))
    except (DataError, CheckpointMismatch, CheckpointError, ConfigError, FileNotFoundError, FileExistsError,
            FloatingPointError, ShardingError, ValueError) as e:
        return _report(e, args)
    last = result.metrics[-1] if result.metrics else {}
    if not is_main_process():
        return 0
    print(json.dumps({"step": result.step, "loss": last.get("loss"), "checkpoint": result.checkpoint,
                      "final": result.final, "metrics": f"{result.output}/metrics.jsonl"}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
