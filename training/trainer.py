"""The trainer: SFT, distillation and DPO on rss_jax NNX models with optax and Orbax checkpoints.

One jitted step per run configuration: `step(params, opt_state, batch, frozen, norm)` takes the policy's nnx.State
(split from its graphdef at the jit boundary), the optimizer state, a batch with a leading gradient-accumulation axis
[A, ...], and the frozen model's state (DPO reference or distillation teacher, never differentiated). The
microbatches run in a lax.scan that sums gradients; one AdamW update follows. Float32 master weights; with
compute_dtype="bfloat16" the forward casts them to bf16 (logits, softmax and losses stay float32).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

import rss_jax
from rss_jax import sharding
from rss_jax.lm import LM, from_params, refuse_quantized
from training import checkpoint as ckpt
from training.data import Dataset, DataError, ExampleStream, build_dataset
from training.draft import draft_vocabulary, make_draft, trim_vocab
from training.losses import LOSS_TYPES, distill_sum, dpo_loss, masked_ce_sum, sequence_logps

MODES = ("sft", "distill", "dpo")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TrainConfig:
    """A training run. `policy`, `reference` and `teacher` are paths/built-in names or already loaded LMs."""
    mode: str
    policy: object
    data: str
    output: str
    steps: int
    batch_size: int = 4
    learning_rate: float = 1e-5
    seed: int = 0
    reference: object = None          # DPO: None = a frozen copy of the initial policy
    teacher: object = None            # distill: required
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_mode: str = "precompute"  # "precompute" (one pass before training) | "online" (inside each step)
    distill_loss: str = "kl"          # "kl" | "tv"
    ce_weight: float = 0.0            # distill: weight of the response cross-entropy added to the divergence
    max_length: int = 512
    grad_accum: int = 1
    warmup_steps: int | None = None   # None: 10% of the steps
    min_lr_ratio: float = 0.1         # the cosine decays to this fraction of the peak learning rate
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0        # 0 disables clipping
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    compute_dtype: str = "float32"
    save_every: int = 0               # 0: checkpoint only at the last step run
    keep_checkpoints: int = 2
    stop_after: int | None = None
    resume: bool = False
    chat: bool = True
    shuffle: bool = True
    init_layers: object = None        # e.g. "0-7,29": start from make_draft(policy, layers)
    head_vocab: int | None = None     # distill: trim the student's head to this many tokens (draft_vocabulary of the
                                      # data's response tokens) before training
    export: bool = True               # write <output>/final at the end of the run
    progress: bool = True
    mesh: object = None               # a jax Mesh (rss_jax.sharding.make_mesh): weights and optimizer state sharded by
                                      # their logical axes, each batch's rows over data x fsdp
    rules: object = None              # rss_jax.sharding.Rules (None: the defaults)


@dataclasses.dataclass
class TrainResult:
    lm: LM                 # the trained policy (float32)
    metrics: list          # this invocation's per-step metric dicts
    step: int              # the last step run
    output: str
    checkpoint: str | None
    final: str | None      # the exported model folder, when the run reached `steps`


# ----------------------------------------------------------------------------------------------------------------
# the compiled step


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step; equal specs share one compiled function (see `_compiled_step`)."""
    mode: str
    graphdef: object
    frozen_graphdef: object
    online_reference: bool
    beta: float
    loss_type: str
    label_smoothing: float
    distill_loss: str
    ce_weight: float
    compute_dtype: str
    weight_decay: float
    max_grad_norm: float
    adam_b1: float
    adam_b2: float
    adam_eps: float


def lr_schedule(peak: float, steps: int, warmup: int, min_ratio: float):
    """Linear warm-up to `peak` over `warmup` updates (the first update already uses peak/warmup), then a cosine
    decay to min_ratio * peak at update `steps`. count = number of updates done so far (a host-side float)."""
    def schedule(count: int) -> float:
        if count < warmup:
            return peak * (count + 1) / warmup
        progress = min(max((count - warmup) / max(steps - warmup, 1), 0.0), 1.0)
        floor = min_ratio * peak
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule


def make_optimizer(spec: StepSpec) -> optax.GradientTransformation:
    """AdamW without its learning rate: clip -> Adam moments -> decoupled weight decay. The step multiplies the
    result by -lr, passed in as an argument, so the schedule (its length, its warm-up) is not compiled into the step
    and runs of different lengths share one compiled function. Same update as optax.adamw(schedule)."""
    parts = [optax.clip_by_global_norm(spec.max_grad_norm)] if spec.max_grad_norm > 0 else []
    parts.append(optax.scale_by_adam(b1=spec.adam_b1, b2=spec.adam_b2, eps=spec.adam_eps))
    if spec.weight_decay:
        parts.append(optax.add_decayed_weights(spec.weight_decay))
    return optax.chain(*parts)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def model_logits(graphdef, state, tokens, compute_dtype="float32"):
    """tokens [B, T] -> logits [B, T, V] float32 (weights cast to compute_dtype for the forward)."""
    if compute_dtype != "float32":
        state = _cast(state, COMPUTE_DTYPES[compute_dtype])
    return nnx.merge(graphdef, state)(tokens)[0]


def _pair_rows(x):
    """[b, 2, ...] (chosen, rejected) -> [2b, ...] with the b chosen rows first: one batched forward for both."""
    return jnp.concatenate([x[:, 0], x[:, 1]], axis=0)


def pair_logps(graphdef, state, tokens, loss_mask, compute_dtype="float32"):
    """tokens/loss_mask [b, 2, T] -> summed response log-probs [b, 2] (chosen, rejected), one forward of 2b rows."""
    flat, mask = _pair_rows(tokens), _pair_rows(loss_mask)
    lp = sequence_logps(model_logits(graphdef, state, flat, compute_dtype), flat, mask)
    b = tokens.shape[0]
    return jnp.stack([lp[:b], lp[b:]], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _pair_logps_jit(graphdef, state, tokens, loss_mask, compute_dtype):
    return pair_logps(graphdef, state, tokens, loss_mask, compute_dtype)


def _micro_loss(spec: StepSpec, params, mb, frozen, norm):
    """One microbatch: (its share of the step loss, summed statistics)."""
    cd = spec.compute_dtype
    if spec.mode == "dpo":
        lp = pair_logps(spec.graphdef, params, mb["tokens"], mb["loss_mask"], cd)
        if spec.online_reference:
            ref = jax.lax.stop_gradient(pair_logps(spec.frozen_graphdef, frozen, mb["tokens"], mb["loss_mask"], cd))
        else:
            ref = mb["ref"]
        _, m = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], spec.beta, spec.label_smoothing, spec.loss_type)
        b = lp.shape[0]
        loss_sum = jnp.sum(m["losses"])
        stats = {"loss": loss_sum, "pairs": jnp.asarray(b, jnp.float32)}
        for k in ("rewards/chosen", "rewards/rejected", "margin", "accuracy"):
            stats[k] = m[k] * b
        return loss_sum / norm, stats
    tokens, mask = mb["tokens"][:, 0], mb["loss_mask"][:, 0]
    logits = model_logits(spec.graphdef, params, tokens, cd)
    ce = masked_ce_sum(logits, tokens, mask)
    stats = {"ce": ce, "tokens": jnp.sum(mask[:, 1:]).astype(jnp.float32)}
    if spec.mode == "sft":
        loss_sum = ce
    else:
        teacher = jax.lax.stop_gradient(model_logits(spec.frozen_graphdef, frozen, tokens, cd))
        div = distill_sum(logits, teacher, mask, spec.distill_loss)
        stats[spec.distill_loss] = div
        # (no 0 * ce term: with a trimmed-head student ce is inf on tokens outside its head)
        loss_sum = div + spec.ce_weight * ce if spec.ce_weight else div
    stats["loss"] = loss_sum
    return loss_sum / norm, stats


@functools.lru_cache(maxsize=8)
def _compiled_step(spec: StepSpec):
    tx = make_optimizer(spec)
    grad_fn = jax.grad(functools.partial(_micro_loss, spec), has_aux=True)

    def step(params, opt_state, batch, frozen, norm, lr):
        first = jax.tree.map(lambda x: x[0], batch)
        grads, stats = grad_fn(params, first, frozen, norm)
        if jax.tree.leaves(batch)[0].shape[0] > 1:
            def body(acc, mb):
                g, s = grad_fn(params, mb, frozen, norm)
                return jax.tree.map(jnp.add, acc, (g, s)), None
            (grads, stats), _ = jax.lax.scan(body, (grads, stats), jax.tree.map(lambda x: x[1:], batch))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        stats = dict(stats, grad_norm=optax.global_norm(grads))
        return params, opt_state, stats

    return jax.jit(step, donate_argnums=(0, 1)), tx


def _finish_metrics(mode: str, stats: dict) -> dict:
    s = {k: float(v) for k, v in stats.items()}
    out = {}
    if mode == "dpo":
        n = max(s["pairs"], 1.0)
        out["loss"] = s["loss"] / n
        for k in ("rewards/chosen", "rewards/rejected", "margin", "accuracy"):
            out[k] = s[k] / n
    else:
        n = max(s["tokens"], 1.0)
        out["loss"] = s["loss"] / n
        out["ce"] = s["ce"] / n
        for k in ("kl", "tv"):
            if k in s:
                out[k] = s[k] / n
    out["grad_norm"] = s["grad_norm"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# set-up helpers


def _load(model, what: str, mesh=None, rules=None) -> LM:
    if isinstance(model, LM):
        refuse_quantized(model, f"the {what} model")
        return model
    if model is None:
        raise ValueError(f"a {what} model is required; pass --{what} (a folder, a .gguf file or a built-in name)")
    return rss_jax.load(os.fspath(model), dtype="float32", mesh=mesh, rules=rules or sharding.DEFAULT_RULES)


def _as_float32(lm: LM, mesh=None, rules=None) -> LM:
    """The model in float32, placed on `mesh` (when given) by its logical axes."""
    if lm.dtype == "float32" and (mesh is None or lm.mesh == mesh):
        return lm
    host = {k: np.asarray(v, np.float32) for k, v in sharding.to_host(lm.params()).items()}
    return from_params(lm.config, host, lm.tokenizer, dtype="float32", source=lm.source, mesh=mesh,
                       rules=rules or sharding.DEFAULT_RULES)


def _opt_shardings(tx, params, mesh):
    """Where each optimizer leaf lives: a leaf shaped like a parameter (Adam's moments) beside that parameter's
    shards, every other leaf (step counts) replicated."""
    where = {tuple(p): (leaf.shape, leaf.sharding) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        for i in range(len(path)):
            hit = where.get(tuple(path[i:]))
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return sharding.replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def _place_batch(batch: dict, mesh, rules):
    """Host batch arrays [grad_accum, batch, ...] -> global arrays with the rows over the batch mesh axes (each
    process copies only the rows its devices hold); ShardingError when those axes do not divide --batch-size."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    out = {}
    for k, v in batch.items():
        logical = (None, "batch") + (None,) * (v.ndim - 2)
        spec = sharding.spec_for(f"the training batch ({k}; --batch-size {v.shape[1]})", v.shape, logical, mesh,
                                 rules)
        out[k] = sharding.place(v, NamedSharding(mesh, spec))
    return out


def check_head_vocabulary(policy: LM, data: Dataset) -> None:
    """A policy with a trimmed head (`training.trim_vocab`) gives log-prob -inf to every other token, so SFT and
    DPO data must use only the head's tokens in their responses (distillation needs no such check)."""
    ids = policy.config.head_token_ids
    if not ids:
        return
    used = np.unique(data.tokens[data.loss_mask.astype(bool)])
    outside = np.setdiff1d(used, np.asarray(ids))
    if outside.size:
        raise DataError(f"{data.path}: the responses use {outside.size} token ids that the policy's trimmed head "
                        f"({len(ids)} tokens) cannot produce, e.g. {outside[:5].tolist()}; their log-probability "
                        "is -inf. Train on text the draft can emit (e.g. its own samples) or trim with those ids.")


def check_same_vocabulary(policy: LM, other: LM, role: str, other_name: str):
    """The frozen model must score the policy's token ids: same vocabulary size and, when both have tokenizers, the
    same token -> id map."""
    if other.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"{role} {other_name!r} has a vocabulary of {other.config.vocab_size} tokens but the policy "
                         f"has {policy.config.vocab_size}; pass a {role} that shares the policy's tokenizer")
    if policy.tokenizer is not None and other.tokenizer is not None \
            and policy.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        raise ValueError(f"{role} {other_name!r} has a different tokenizer (token -> id map) from the policy; "
                         f"fix: pass a {role} that shares the policy's tokenizer")


def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(cfg: TrainConfig, data: Dataset, warmup: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"mode": cfg.mode, "data_sha1": _file_digest(cfg.data), "examples": len(data), "width": data.width,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "learning_rate": cfg.learning_rate, "warmup_steps": warmup, "min_lr_ratio": cfg.min_lr_ratio,
            "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "beta": cfg.beta,
            "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing,
            "reference_mode": cfg.reference_mode, "distill_loss": cfg.distill_loss, "ce_weight": cfg.ce_weight,
            "compute_dtype": cfg.compute_dtype, "shuffle": cfg.shuffle, "head_vocab": cfg.head_vocab}


def validate(cfg: TrainConfig):
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.head_vocab is not None and (cfg.mode != "distill" or int(cfg.head_vocab) < 1):
        raise ValueError(f"--head-vocab must be a positive token count and is for distillation only (the student "
                         f"learns every token of the teacher it can emit), got {cfg.head_vocab!r} in mode "
                         f"{cfg.mode!r}")
    if cfg.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("--batch-size and --grad-accum must be at least 1")
    if cfg.stop_after is not None and not 1 <= cfg.stop_after <= cfg.steps:
        raise ValueError(f"--stop-after must lie in 1..{cfg.steps} (--steps), got {cfg.stop_after}")
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        raise ValueError(f"--label-smoothing must lie in [0, 0.5], got {cfg.label_smoothing}")
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be positive, got {cfg.beta}")
    if cfg.reference_mode not in ("precompute", "online"):
        raise ValueError(f"--reference-mode must be 'precompute' or 'online', got {cfg.reference_mode!r}")
    if cfg.distill_loss not in ("kl", "tv"):
        raise ValueError(f"--distill-loss must be 'kl' or 'tv', got {cfg.distill_loss!r}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"--compute-dtype must be one of {sorted(COMPUTE_DTYPES)}, got {cfg.compute_dtype!r}")
    if cfg.mode == "distill" and cfg.teacher is None:
        raise ValueError("distillation needs --teacher")
    if cfg.mode != "dpo" and cfg.reference is not None:
        raise ValueError("--reference is a DPO option")


def precompute_reference(ref: LM, data: Dataset, batch_size: int, compute_dtype: str = "float32",
                         rules=None) -> np.ndarray:
    """Reference log-probs of every pair in one pass: [N, 2] (chosen, rejected), batches in data order."""
    n = len(data)
    out = np.zeros((n, 2), np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # the last batch wraps so every call has the same shape
        batch = _place_batch({"tokens": data.tokens[idx][None], "loss_mask": data.loss_mask[idx][None]}, ref.mesh,
                             rules or sharding.DEFAULT_RULES)
        lp = _pair_logps_jit(ref.graphdef, ref.state, batch["tokens"][0], batch["loss_mask"][0], compute_dtype)
        lp = sharding.to_host(lp)
        take = min(batch_size, n - start)
        out[start:start + take] = np.asarray(lp)[:take]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see TrainConfig. Every input is checked before anything is written."""
    validate(cfg)
    output = os.path.abspath(cfg.output)
    mesh, rules = cfg.mesh, cfg.rules or sharding.DEFAULT_RULES
    main = sharding.is_main_process()  # only process 0 writes metrics, run.json and the progress bar
    # a policy that is cut (init_layers) or trimmed (head_vocab) is built on one device and placed once, after
    reshaped = cfg.init_layers is not None or bool(cfg.head_vocab)
    policy = _as_float32(_load(cfg.policy, "policy", None if reshaped else mesh, rules), None if reshaped else mesh,
                         rules)
    if cfg.init_layers is not None:
        policy = make_draft(policy, cfg.init_layers)
    tok = policy.tokenizer
    pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0
    data = build_dataset(cfg.data, "dpo" if cfg.mode == "dpo" else "sft", tok, policy.config.vocab_size,
                         cfg.max_length, cfg.chat, pad_id=pad_id)
    if cfg.head_vocab:
        responses = [row[m.astype(bool)] for row, m in zip(data.tokens[:, 0], data.loss_mask[:, 0])]
        policy = trim_vocab(policy, draft_vocabulary(responses, cfg.head_vocab))
    policy = _as_float32(policy, mesh, rules)
    if cfg.mode != "distill" or cfg.ce_weight:
        check_head_vocabulary(policy, data)
    per_step = cfg.batch_size * cfg.grad_accum
    if len(data) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(data)} examples, fewer than one batch of {cfg.batch_size}")

    frozen = None
    if cfg.mode == "dpo":
        if cfg.reference is not None:
            frozen = _as_float32(_load(cfg.reference, "reference", mesh, rules), mesh, rules)
            check_same_vocabulary(policy, frozen, "reference", str(getattr(frozen, "source", cfg.reference)))
        else:
            frozen = policy  # read-only: the policy's own buffers are never donated (params are copied below)
    elif cfg.mode == "distill":
        frozen = _as_float32(_load(cfg.teacher, "teacher", mesh, rules), mesh, rules)
        check_same_vocabulary(policy, frozen, "teacher", str(getattr(frozen, "source", cfg.teacher)))

    existing = ckpt.latest_checkpoint(output)
    if cfg.resume and existing is None:
        raise FileNotFoundError(f"--resume: {ckpt.checkpoint_dir(output)} holds no checkpoint to resume from")
    if not cfg.resume and existing is not None:
        raise FileExistsError(f"{output} already holds a run ({existing}); pass --resume to continue it or choose "
                              "another --output")

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 10
    fingerprint = _fingerprint(cfg, data, warmup)
    online = cfg.mode == "dpo" and cfg.reference_mode == "online"
    spec = StepSpec(mode=cfg.mode, graphdef=policy.graphdef,
                    frozen_graphdef=frozen.graphdef if (cfg.mode == "distill" or online) else None,
                    online_reference=online, beta=float(cfg.beta), loss_type=cfg.loss_type,
                    label_smoothing=float(cfg.label_smoothing), distill_loss=cfg.distill_loss,
                    ce_weight=float(cfg.ce_weight), compute_dtype=cfg.compute_dtype,
                    weight_decay=float(cfg.weight_decay),
                    max_grad_norm=float(cfg.max_grad_norm), adam_b1=float(cfg.adam_b1), adam_b2=float(cfg.adam_b2),
                    adam_eps=float(cfg.adam_eps))
    step_fn, tx = _compiled_step(spec)
    schedule = lr_schedule(float(cfg.learning_rate), int(cfg.steps), int(warmup), float(cfg.min_lr_ratio))

    params = jax.tree.map(lambda x: x.copy(), policy.state)  # a private copy (same layout): the step donates it
    if mesh is not None:
        with jax.set_mesh(mesh):
            opt_state = jax.jit(tx.init, out_shardings=_opt_shardings(tx, params, mesh))(params)
    else:
        opt_state = tx.init(params)
    rng = jax.random.key(cfg.seed)
    start, position = 0, 0
    if cfg.resume:
        meta = ckpt.read_meta(existing)
        diff = {k: (meta.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()
                if meta.get("fingerprint", {}).get(k) != v}
        if diff:
            raise ckpt.CheckpointMismatch(f"{existing} was written by a different run; differing settings "
                                          f"(checkpoint, now): {diff}")
        params, opt_state, rng, start, position = ckpt.restore_checkpoint(existing, params, opt_state, rng)
    last = cfg.stop_after if cfg.stop_after is not None else cfg.steps
    if start >= last:
        raise ValueError(f"the checkpoint is at step {start}; nothing to do for a run that ends at step {last}")

    ref_logps = None
    if cfg.mode == "dpo" and not online:
        ref_logps = precompute_reference(frozen, data, cfg.batch_size, cfg.compute_dtype, rules)
    frozen_state = frozen.state if spec.frozen_graphdef is not None else None

    os.makedirs(output, exist_ok=True)
    metrics_path = os.path.join(output, "metrics.jsonl")
    kept = []
    if cfg.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    if main:
        with open(os.path.join(output, "run.json"), "w") as f:
            json.dump({"fingerprint": fingerprint, "policy": str(getattr(policy, "source", "")),
                       "data": os.path.abspath(cfg.data), "init_layers": cfg.init_layers}, f, indent=1, default=str)

    stream = ExampleStream(len(data), cfg.seed, cfg.shuffle, position)
    norm_key = "pairs" if cfg.mode == "dpo" else "tokens"
    history = []
    checkpoint_path = None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.mode}", dynamic_ncols=True)
    with open(metrics_path if main else os.devnull, "w") as mf:
        mf.writelines(kept)
        mf.flush()
        for step in range(start + 1, last + 1):
            idx = stream.take(per_step).reshape(cfg.grad_accum, cfg.batch_size)
            batch = {"tokens": data.tokens[idx], "loss_mask": data.loss_mask[idx]}
            if ref_logps is not None:
                batch["ref"] = ref_logps[idx]
            if norm_key == "pairs":
                norm = float(per_step)
            else:
                norm = float(max(data.loss_mask[idx][..., 1:].sum(), 1))
            rng, _ = jax.random.split(rng)  # the run's random stream (no stochastic layer uses it yet)
            lr = schedule(step - 1)
            t0 = time.perf_counter()
            scalars = (jnp.float32(norm), jnp.float32(lr))
            if mesh is not None and jax.process_count() > 1:
                scalars = sharding.to_global(scalars, mesh)
            params, opt_state, stats = step_fn(params, opt_state, _place_batch(batch, mesh, rules), frozen_state,
                                               *scalars)
            stats = jax.device_get(sharding.to_host(stats))
            dt = time.perf_counter() - t0
            row = {"step": step, **_finish_metrics(cfg.mode, stats),
                   "tokens_per_s": float(data.n_tokens[idx].sum()) / dt, "lr": float(np.float32(lr)),
                   "step_time_s": dt}
            history.append(row)
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"step {step}: the loss is {row['loss']}; lower --learning-rate")
            if bar is not None:
                post = {"loss": f"{row['loss']:.4f}"}
                if cfg.mode == "dpo":
                    post["acc"] = f"{row['accuracy']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if step == last or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint_path = ckpt.save_checkpoint(output, step, params, opt_state, rng, stream.position,
                                                       {"fingerprint": fingerprint}, keep=cfg.keep_checkpoints)
    if bar is not None:
        bar.close()

    trained = LM(config=policy.config, graphdef=policy.graphdef, state=params, tokenizer=tok,
                 source=output, dtype="float32")
    final = None
    if last == cfg.steps and cfg.export:
        final = trained.save(os.path.join(output, "final"), overwrite=True)
    return TrainResult(lm=trained, metrics=history, step=last, output=output, checkpoint=checkpoint_path,
                       final=final)
