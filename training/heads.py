"""Training feature-draft heads: distillation toward the target with a multi-step loss, then DPO alignment.

Data. The target's own responses (prompt ids + response ids) are run once through the target with taps
(`extract_features`): per position the tapped hidden states, the target's final normed hidden state and the
log-normaliser of its tempered logits are cached (`FeatureSet`, saved as one .npz), so training never runs the
target again. The teacher distribution over the draft vocabulary D at position t is
p_t(v) = exp(W_v . h_t / T - lse_t) for v in D (its mass outside D is the head's unavoidable loss).

Head slot u reads the features of position u and token u+1 and predicts token u+2 (teacher p_{u+1}).

Training-time test (multi-step) loss. Drafting step j of a block that starts at slot s0 runs at slot u = s0 + j - 1
with the head's own step-(j-1) output as its feature, attending to the true-feature keys of slots <= s0 and to the
keys of steps 2..j of the same block. `ttt_logits` computes every step j = 1..J for every block start at once: step
j's query at slot u attends to the step-1 keys of slots <= u - j + 1 and to step i's key at slot u - (j - i) for
i = 2..j, exactly what the cached decode loop does. The loss is a weighted sum over steps of KL(p || q_j) (q_j the
tempered head distribution, the proposal the engine samples from), optionally plus total variation (= 1 minus the
acceptance), on response positions whose block start lies in the response (s0 >= prompt length - 2).

DPO. The head's policy log-probability of a response is the sum of its step-1 (true-feature) log-probabilities, the
quantity that enters p~ = pi_ref pi_r / pi_sft at verification. The reference is the frozen SFT head. A consistency
term KL(stop_grad(q_1) || q_j), j >= 2, keeps the aligned head's fed-back drafting steps close to its own
true-feature distribution, so multi-step drafting stays accurate after alignment.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rss_jax.heads import FeatureDraft, check_temperature_scale, from_flat
from rss_jax.loading.names import flatten
from rss_jax.models.layers import attention
from rss_jax.sampling import validate_draft_temperature
from training import checkpoint as ckpt
from training.data import epoch_permutation

_NEG = -1e30


# ----------------------------------------------------------------------------------------------------------------
# Cached target features
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureSet:
    """Per-sequence arrays, right-padded to width S: tokens [N, S] int32, lengths [N] (prompt + response),
    prompt_lens [N], taps [N, S, n_taps, E] float16, final [N, S, E] float16 (the target's normed last hidden
    state), lse [N, S] float32 (logsumexp of the target's logits / T over the full vocabulary)."""
    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lens: np.ndarray
    taps: np.ndarray
    final: np.ndarray
    lse: np.ndarray
    meta: dict

    ARRAYS = ("tokens", "lengths", "prompt_lens", "taps", "final", "lse")  # the per-sequence fields, in order

    def __len__(self):
        return len(self.tokens)

    def subset(self, idx) -> "FeatureSet":
        idx = np.asarray(idx)
        return FeatureSet(*(getattr(self, name)[idx] for name in self.ARRAYS), meta=dict(self.meta))

    @classmethod
    def concat(cls, parts: list["FeatureSet"]) -> "FeatureSet":
        """The rows of every part, in order (parts must share width, taps, temperature and target model)."""
        first = parts[0]
        for f in parts[1:]:
            if f.tokens.shape[1] != first.tokens.shape[1] or any(f.meta.get(k) != first.meta.get(k)
                                                                  for k in ("taps", "temperature", "target")):
                raise ValueError("FeatureSet.concat needs parts with the same width, taps, temperature and target "
                                 "model")
        return cls(*(np.concatenate([getattr(f, name) for f in parts]) for name in cls.ARRAYS), meta=dict(first.meta))

    def save(self, path: str) -> None:
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=self.tokens, lengths=self.lengths, prompt_lens=self.prompt_lens, taps=self.taps,
                 final=self.final, lse=self.lse, meta=json.dumps(self.meta))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureSet":
        z = np.load(path)
        return cls(z["tokens"], z["lengths"], z["prompt_lens"], z["taps"], z["final"], z["lse"],
                   json.loads(str(z["meta"])))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _features(graphdef, taps: tuple, temperature: float, state, tokens):
    """One jitted function for every extraction call (keyed by graphdef, taps and T): no recompile per call."""
    model = nnx.merge(graphdef, state)
    h, _, tapped = model(tokens, return_hidden=True, taps=taps)
    lse = jax.nn.logsumexp(model.unembed(h) / temperature, axis=-1)
    return tapped.astype(jnp.float16), h.astype(jnp.float16), lse


def extract_features(target, records, taps, temperature: float = 0.8, width: int | None = None,
                     batch_size: int = 8, progress: bool = True) -> FeatureSet:
    """Run the target once over every record ({"prompt_ids", "response_ids"}) with taps; see FeatureSet."""
    taps = tuple(int(t) for t in taps)
    seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in records]
    longest = max(len(s) for s in seqs)
    width = width or (-(-longest // 16) * 16)
    if longest > width:
        raise ValueError(f"a record has {longest} tokens, more than width={width}; raise width or cut the record")
    n = len(seqs)
    tokens = np.zeros((n, width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    e = target.config.hidden_size
    out_taps = np.zeros((n, width, len(taps), e), np.float16)
    out_final = np.zeros((n, width, e), np.float16)
    out_lse = np.zeros((n, width), np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="target features", unit="batch")
    for s in starts:
        chunk = tokens[s:s + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, width), np.int32)])
        t, f, l = _features(target.graphdef, taps, float(temperature), target.state, jnp.asarray(chunk))
        m = batch_size - pad
        out_taps[s:s + m], out_final[s:s + m], out_lse[s:s + m] = (np.asarray(t)[:m], np.asarray(f)[:m],
                                                                  np.asarray(l)[:m])
    meta = {"taps": list(taps), "temperature": float(temperature), "target": target.source}
    return FeatureSet(tokens, np.asarray([len(s) for s in seqs], np.int32),
                      np.asarray([len(r["prompt_ids"]) for r in records], np.int32), out_taps, out_final, out_lse,
                      meta)


# ----------------------------------------------------------------------------------------------------------------
# The multi-step (training-time test) forward
# ----------------------------------------------------------------------------------------------------------------


def _shift_right(x, n: int):
    """x [B, T, ...] -> y with y[:, u] = x[:, u - n] (zeros for u < n)."""
    if n == 0:
        return x
    pad = jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], x.dtype)
    return jnp.concatenate([pad, x[:, :-n]], axis=1)


def _ttt_attention(q, ks, vs, j: int):
    """Step-j attention (j >= 2): q [B, T, H, D]; ks/vs lists of the j steps' keys/values [B, T, KVH, D].
    Query u sees step-1 keys of slots <= u - j + 1 and step i's key at slot u - (j - i), i = 2..j."""
    b, t, h, d = q.shape
    kvh = ks[0].shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)
    scale = 1.0 / math.sqrt(d)
    s1 = jnp.einsum("btkgd,bskd->bkgts", qg, ks[0], preferred_element_type=jnp.float32) * scale
    u = jnp.arange(t)
    mask = jnp.arange(t)[None, :] <= (u[:, None] - j + 1)
    s1 = jnp.where(mask[None, None, None], s1, _NEG)
    diag_k = [_shift_right(ks[i - 1], j - i) for i in range(2, j + 1)]
    diag_v = [_shift_right(vs[i - 1], j - i) for i in range(2, j + 1)]
    sd = jnp.stack([jnp.einsum("btkgd,btkd->bkgt", qg, kk, preferred_element_type=jnp.float32) * scale
                    for kk in diag_k], axis=-1)  # [B, KVH, G, T, j-1]
    probs = jax.nn.softmax(jnp.concatenate([s1, sd], axis=-1), axis=-1)
    p1, pd = probs[..., :t], probs[..., t:]
    out = jnp.einsum("bkgts,bskd->btkgd", p1.astype(vs[0].dtype), vs[0])
    for i, vv in enumerate(diag_v):
        out = out + jnp.einsum("bkgt,btkd->btkgd", pd[..., i].astype(vv.dtype), vv)
    return out.reshape(b, t, h * d).astype(q.dtype)


def ttt_logits(head, taps, tokens, embed_table, out_rows, steps: int):
    """taps [B, S, n, E], tokens [B, S] -> list of `steps` logits [B, S-1, |D|] (slot u = 0..S-2 predicts token
    u+2); step j >= 2 reads the head's own step-(j-1) outputs as features (see the module docstring). Each of the
    head's decoder layers keeps its own keys and values of every step."""
    feat = head.fuse(taps[:, :-1].astype(jnp.float32))
    x = tokens[:, 1:]
    t = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], x.shape)
    depth = head.config.depth
    ks, vs = [[] for _ in range(depth)], [[] for _ in range(depth)]
    out, a = [], None
    for j in range(1, steps + 1):
        a = head.inputs(feat if j == 1 else _shift_right(a, 1), x, embed_table)
        for index in range(depth):
            q, k, v = head.qkv(a, pos, index)
            ks[index].append(k)
            vs[index].append(v)
            o = attention(q, k, v)[0] if j == 1 else _ttt_attention(q, ks[index], vs[index], j)
            a = head.finish(a, o, index)
        out.append(head.logits(a, out_rows))
    return out


def step_masks(lengths, prompt_lens, width: int, steps: int):
    """[steps, B, S-1] float32: slot u counts for step j when token u+2 is a response token of the row and the
    block start u - j + 1 is at or after prompt length - 2 (where decoding blocks start)."""
    u = jnp.arange(width - 1)[None, :]
    out = []
    for j in range(1, steps + 1):
        ok = (u + 2 < lengths[:, None]) & (u >= prompt_lens[:, None] - 3 + j) & (u >= j - 1)
        out.append(ok.astype(jnp.float32))
    return jnp.stack(out)


def teacher_probs(final, lse, out_rows, temperature: float):
    """The target's tempered distribution over D at slots u (positions u+1): [B, S-1, |D|] (mass <= 1)."""
    logits = jnp.einsum("bte,ve->btv", final[:, 1:].astype(jnp.float32), out_rows,
                        preferred_element_type=jnp.float32)
    return jnp.exp(logits / temperature - lse[:, 1:, None])


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadTrainSpec:
    """Static settings of a head-training step."""
    graphdef: object
    steps: int = 3
    step_decay: float = 0.8
    temperature: float = 0.8
    tv_weight: float = 0.0
    mode: str = "distill"     # "distill" | "dpo"
    beta: float = 0.1
    consistency: float = 1.0  # dpo: weight of KL(sg(q_1) || q_j), j >= 2
    feature_noise: float = 0.0  # distill: uniform noise on the taps, this fraction of each tap vector's RMS
    proposal_temperature: float | None = None  # the alpha metric's proposal temperature (None: `temperature`);
    # the loss, TV term included, always uses `temperature`


def noisy_taps(taps, key, scale: float):
    """taps + scale * rms(tap) * U(-1, 1), per element (EAGLE's feature augmentation, made relative because the
    tapped residual streams differ in size from layer to layer): [B, S, n, E] float32."""
    taps = taps.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(taps), axis=-1, keepdims=True))
    return taps + scale * rms * jax.random.uniform(key, taps.shape, jnp.float32, -1.0, 1.0)


def _distill_loss(spec: HeadTrainSpec, params, batch, embed_table, out_rows):
    head = nnx.merge(spec.graphdef, params)
    masks = step_masks(batch["lengths"], batch["prompt_lens"], batch["tokens"].shape[1], spec.steps)
    p = teacher_probs(batch["final"], batch["lse"], out_rows, spec.temperature)
    taps = batch["taps"]
    if spec.feature_noise > 0:
        taps = noisy_taps(taps, batch["noise_key"], spec.feature_noise)
    logits = ttt_logits(head, taps, batch["tokens"], embed_table, out_rows, spec.steps)
    total, metrics = 0.0, {}
    wsum = sum(spec.step_decay ** i for i in range(spec.steps))
    xlogx = jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
    for j, (lg, m) in enumerate(zip(logits, masks)):
        logq = jax.nn.log_softmax(lg / spec.temperature, axis=-1)
        kl = xlogx - jnp.sum(p * logq, axis=-1)  # KL(p || q) over D (p's mass outside D only adds a constant)
        alpha = jnp.sum(jnp.minimum(p, jnp.exp(logq)), axis=-1)
        n = jnp.maximum(m.sum(), 1.0)
        loss_j = jnp.sum(kl * m) / n + spec.tv_weight * jnp.sum((1.0 - alpha) * m) / n
        total = total + (spec.step_decay ** j / wsum) * loss_j
        if spec.proposal_temperature is not None:  # the metric of a proposal at the engine's draft_temperature
            alpha = jnp.sum(jnp.minimum(p, jax.nn.softmax(lg / spec.proposal_temperature, axis=-1)), axis=-1)
        metrics[f"kl_{j + 1}"] = jnp.sum(kl * m) / n
        metrics[f"alpha_{j + 1}"] = jnp.sum(alpha * m) / n
    metrics["loss"] = total
    return total, metrics


def response_logps(head, batch, embed_table, out_rows, steps: int = 1):
    """Sum over response tokens in the draft vocabulary of the head's step-1 log-probabilities at T = 1 [B], and
    the per-step logits (for the consistency term)."""
    logits = ttt_logits(head, batch["taps"], batch["tokens"], embed_table, out_rows, steps)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    target_slot = batch["tokens"][:, 2:]  # slot u predicts token u+2
    lp = logp[:, :-1]
    idx = batch["dvocab_index"][:, 2:]  # position of each token in D, -1 outside
    tok_lp = jnp.take_along_axis(lp, jnp.maximum(idx, 0)[..., None], axis=-1)[..., 0]
    u = jnp.arange(target_slot.shape[1])[None]
    m = (u + 2 < batch["lengths"][:, None]) & (u + 2 >= batch["prompt_lens"][:, None]) & (idx >= 0)
    return jnp.sum(jnp.where(m, tok_lp, 0.0), axis=1), logits


def _dpo_loss(spec: HeadTrainSpec, params, batch, embed_table, out_rows):
    """batch rows are [chosen_0, rejected_0, chosen_1, rejected_1, ...]; batch["ref_logps"] [B] the SFT head's."""
    head = nnx.merge(spec.graphdef, params)
    lp, logits = response_logps(head, batch, embed_table, out_rows, spec.steps)
    ratio = lp - batch["ref_logps"]
    margin = spec.beta * (ratio[0::2] - ratio[1::2])
    dpo = -jnp.mean(jax.nn.log_sigmoid(margin))
    cons = 0.0
    if spec.steps > 1:
        masks = step_masks(batch["lengths"], batch["prompt_lens"], batch["tokens"].shape[1], spec.steps)
        q1 = jax.lax.stop_gradient(jax.nn.softmax(logits[0] / spec.temperature, axis=-1))
        lq1 = jnp.log(jnp.maximum(q1, 1e-30))
        for j in range(1, spec.steps):
            lqj = jax.nn.log_softmax(logits[j] / spec.temperature, axis=-1)
            kl = jnp.sum(q1 * (lq1 - lqj), axis=-1)
            cons = cons + jnp.sum(kl * masks[j]) / jnp.maximum(masks[j].sum(), 1.0) / (spec.steps - 1)
    total = dpo + spec.consistency * cons
    acc = jnp.mean((margin > 0).astype(jnp.float32))
    return total, {"loss": total, "dpo": dpo, "consistency": cons, "reward_accuracy": acc,
                   "margin": jnp.mean(margin) / spec.beta}


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeadTrainConfig:
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 3e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    ttt_steps: int = 3
    step_decay: float = 0.8
    temperature: float = 0.8
    tv_weight: float = 0.0
    beta: float = 0.1
    consistency: float = 1.0
    feature_noise: float = 0.0  # distill: uniform noise on the taps, this fraction of each tap's RMS (0: none)
    eval_every: int = 0
    output: str | None = None     # metrics.jsonl and checkpoints go here
    save_every: int = 0
    resume: bool = False
    stop_after: int | None = None  # end after this step with a checkpoint, as an interruption would
    log_every: int = 10
    progress: bool = True


def target_tables(target, head: FeatureDraft):
    """(embed_table [V, E], out_rows W[D] [|D|, E]) float32 of the head's target."""
    m = target.module
    ids = jnp.asarray(head.config.token_ids)
    return m.token_embeddings().astype(jnp.float32), jnp.take(m.output_matrix(), ids, axis=0).astype(jnp.float32)


def _optimizer(cfg: HeadTrainConfig):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup, 1), max(cfg.steps, 2),
                                               cfg.learning_rate * cfg.min_lr_ratio)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(sched, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def _batch(fs: FeatureSet, idx, extra=None) -> dict:
    b = {"tokens": jnp.asarray(fs.tokens[idx]), "lengths": jnp.asarray(fs.lengths[idx]),
         "prompt_lens": jnp.asarray(fs.prompt_lens[idx]), "taps": jnp.asarray(fs.taps[idx]),
         "final": jnp.asarray(fs.final[idx]), "lse": jnp.asarray(fs.lse[idx])}
    for k, v in (extra or {}).items():
        b[k] = jnp.asarray(v[idx])
    return b


def _make_step(spec: HeadTrainSpec, opt):
    loss_fn = _distill_loss if spec.mode == "distill" else _dpo_loss

    @jax.jit
    def step(params, opt_state, batch, embed_table, out_rows):
        (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(spec, p, batch, embed_table, out_rows),
                                                    has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics
    return step


def evaluate_acceptance(target, head: FeatureDraft, fs: FeatureSet, steps: int = 4, temperature: float = 0.8,
                        batch_size: int = 16, draft_temperature: float | None = None) -> list[float]:
    """Closed-form per-offset acceptance alpha_i = mean over response positions of sum_v min(q_i, p) (p: the
    target's tempered distribution, including its mass outside D; q_i: the head's drafting step i, true features
    for i = 1, its own fed-back features after, at `draft_temperature`, default `temperature`), i = 1..steps."""
    embed, rows = target_tables(target, head)
    spec = HeadTrainSpec(graphdef=head.graphdef, steps=steps, temperature=temperature,
                         proposal_temperature=validate_draft_temperature(draft_temperature))
    return _mean_over_positions(fs, batch_size, steps, lambda batch: _alpha_sums(spec, head.state, batch, embed, rows))


def _mean_over_positions(fs: FeatureSet, batch_size: int, steps: int, sums_of) -> list[float]:
    """Per drafting step, the mean over every counted response position of `fs`: `sums_of(batch)` gives ([steps]
    sums, [steps] position counts) of one fixed-size batch (the last one padded with rows of length 0, which count
    nowhere, so every batch has one shape and one compiled function)."""
    sums, counts = np.zeros(steps), np.zeros(steps)
    for s in range(0, len(fs), batch_size):
        idx = np.arange(s, min(s + batch_size, len(fs)))
        pad = batch_size - len(idx)
        batch = _batch(fs, np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx)
        if pad:
            batch["lengths"] = batch["lengths"].at[len(idx):].set(0)
        part, n = sums_of(batch)
        sums += np.asarray(part)
        counts += np.asarray(n)
    return (sums / np.maximum(counts, 1)).tolist()


def evaluate_shifted_acceptance(target, draft: FeatureDraft, sft: FeatureDraft, fs: FeatureSet, steps: int = 3,
                                temperature: float = 0.8, shift: float = 1.0, batch_size: int = 16,
                                draft_temperature: float | None = None) -> list[float]:
    """Closed-form per-offset acceptance of exact SSS with heads: alpha_i = mean over response positions of
    sum_v min(q_i, p~), p~ = softmax over D of (l_ref + shift (l_r - l_sft)) / T, where l_r and l_sft are the aligned
    `draft` and its `sft` head on the target's true features (what the engine's re-run puts into p~) and q_i is the
    draft's drafting step i (fed-back features for i >= 2) at `draft_temperature` (default `temperature`). Both
    heads must share taps and draft vocabulary (as a head and its DPO copy do). The samples in `fs` are the
    target's, not p~'s, so this weighs positions by the unaligned target's text: a proxy for SSS's own."""
    if draft.config.token_ids != sft.config.token_ids or tuple(draft.config.taps) != tuple(sft.config.taps):
        raise ValueError("evaluate_shifted_acceptance needs an aligned head and an SFT head with the same taps and "
                         "draft vocabulary (the aligned head is a DPO copy of the SFT head)")
    draft.check_target(target)
    embed, rows = target_tables(target, draft)
    dt = validate_draft_temperature(draft_temperature) or temperature
    # temperatures and shift are traced: calibrating over several proposal temperatures compiles once
    knobs = tuple(jnp.float32(x) for x in (temperature, dt, shift))
    return _mean_over_positions(fs, batch_size, steps, lambda batch: _shifted_alpha_sums(
        (draft.graphdef, sft.graphdef, steps), draft.state, sft.state, batch, embed, rows, *knobs))


@functools.partial(jax.jit, static_argnums=0)
def _shifted_alpha_sums(static, p_draft, p_sft, batch, embed_table, out_rows, temperature, draft_t, shift):
    gd_d, gd_s, steps = static
    draft, sft = nnx.merge(gd_d, p_draft), nnx.merge(gd_s, p_sft)
    lq = ttt_logits(draft, batch["taps"], batch["tokens"], embed_table, out_rows, steps)
    ls = ttt_logits(sft, batch["taps"], batch["tokens"], embed_table, out_rows, 1)[0]
    lt = jnp.einsum("bte,ve->btv", batch["final"][:, 1:].astype(jnp.float32), out_rows,
                    preferred_element_type=jnp.float32)
    p_tilde = jax.nn.softmax((lt + shift * (lq[0] - ls)) / temperature, axis=-1)
    masks = step_masks(batch["lengths"], batch["prompt_lens"], batch["tokens"].shape[1], steps)
    overlap = [jnp.sum(jnp.sum(jnp.minimum(jax.nn.softmax(lq[j] / draft_t, axis=-1), p_tilde), axis=-1) * masks[j])
               for j in range(steps)]
    return jnp.stack(overlap), masks.sum(axis=(1, 2))


def calibrate_proposal(target, head: FeatureDraft, fs: FeatureSet, scales=(0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0),
                       steps: int = 3, temperature: float = 0.8, batch_size: int = 16, sft: FeatureDraft | None = None,
                       shift: float = 1.0) -> tuple[float, list[dict]]:
    """The proposal temperature, as a fraction of `temperature`, at which `head` drafts best on `fs` (held-out
    responses of the target): the scale with the highest mean closed-form acceptance alpha_1..alpha_steps at
    draft_temperature = scale * temperature, against the target (`evaluate_acceptance`, an SD proposal) or, given
    the `sft` head, against exact SSS's p~ (`evaluate_shifted_acceptance`, an aligned head). A head distilled with
    KL(p || q) tends to be under-confident, and a sharper proposal then overlaps more; any proposal keeps SD and
    exact SSS exact. Returns (best scale, one row {scale, draft_temperature, alpha, mean_alpha} per scale)."""
    if not scales:
        raise ValueError("calibrate_proposal needs at least one scale to try, e.g. scales=(0.8, 0.9, 1.0)")
    rows = []
    for sc in scales:
        sc = check_temperature_scale(sc)  # each candidate is a head's draft_temperature_scale: the same check
        if sc is None:
            raise ValueError("calibrate_proposal's scales are numbers > 0; None is not one")
        dt = None if sc == 1 else sc * temperature
        if sft is None:
            alpha = evaluate_acceptance(target, head, fs, steps=steps, temperature=temperature,
                                        batch_size=batch_size, draft_temperature=dt)
        else:
            alpha = evaluate_shifted_acceptance(target, head, sft, fs, steps=steps, temperature=temperature,
                                                shift=shift, batch_size=batch_size, draft_temperature=dt)
        rows.append({"scale": float(sc), "draft_temperature": float(sc) * temperature, "alpha": alpha,
                     "mean_alpha": float(np.mean(alpha))})
    best = max(rows, key=lambda r: r["mean_alpha"])
    return best["scale"], rows


@functools.partial(jax.jit, static_argnums=0)
def _alpha_sums(spec: HeadTrainSpec, params, batch, embed_table, out_rows):
    """Per drafting step: (sum over counted positions of sum_v min(p, q_j), number of counted positions)."""
    met = _distill_loss(spec, params, batch, embed_table, out_rows)[1]
    masks = step_masks(batch["lengths"], batch["prompt_lens"], batch["tokens"].shape[1], spec.steps)
    n = masks.sum(axis=(1, 2))
    return jnp.stack([met[f"alpha_{j + 1}"] for j in range(spec.steps)]) * jnp.maximum(n, 1.0), n


def train_head(target, head: FeatureDraft, fs: FeatureSet, cfg: HeadTrainConfig, mode: str = "distill",
               reference: FeatureDraft | None = None, pairs: np.ndarray | None = None,
               eval_set: FeatureSet | None = None) -> tuple[FeatureDraft, list]:
    """Train `head` on `fs` (distill) or on preference pairs (dpo: `pairs` [P, 2] row indices into fs, chosen first;
    `reference` the frozen SFT head). Returns (trained head, metric rows). Writes <output>/metrics.jsonl."""
    head.check_target(target)
    if mode not in ("distill", "dpo"):
        raise ValueError(f"head training mode must be 'distill' or 'dpo', got {mode!r}")
    if mode == "dpo" and reference is not None and reference.config.token_ids != head.config.token_ids:
        raise ValueError("DPO of a head needs a reference head with the same draft vocabulary (token_ids)")
    embed, rows = target_tables(target, head)
    if cfg.feature_noise < 0:
        raise ValueError(f"feature_noise must be >= 0 (a fraction of each tap's RMS), got {cfg.feature_noise}")
    spec = HeadTrainSpec(graphdef=head.graphdef, steps=cfg.ttt_steps, step_decay=cfg.step_decay,
                         temperature=cfg.temperature, tv_weight=cfg.tv_weight, mode=mode, beta=cfg.beta,
                         consistency=cfg.consistency, feature_noise=cfg.feature_noise if mode == "distill" else 0.0)
    opt = _optimizer(cfg)
    params = jax.tree.map(jnp.asarray, head.state)
    opt_state = opt.init(params)
    step_fn = _make_step(spec, opt)
    extra = None
    if mode == "dpo":
        if reference is None or pairs is None:
            raise ValueError("DPO of a head needs reference= (the frozen SFT head) and pairs= ([P, 2] row indices)")
        where = np.full((head.config.target_vocab_size,), -1, np.int32)
        where[np.asarray(head.config.token_ids)] = np.arange(len(head.config.token_ids), dtype=np.int32)
        dv = where[fs.tokens]
        ref_lp = _reference_logps(target, reference, fs, dv, cfg.batch_size)
        extra = {"dvocab_index": dv, "ref_logps": ref_lp}
    n_items = len(pairs) if mode == "dpo" else len(fs)
    per_batch = cfg.batch_size // 2 if mode == "dpo" else cfg.batch_size
    if n_items < per_batch:
        raise ValueError(f"{n_items} training items, fewer than one batch of {per_batch}; lower --batch-size or give "
                         "more data")
    log, start = [], 0
    rng_key = jax.random.key(cfg.seed)
    metrics_path = os.path.join(cfg.output, "metrics.jsonl") if cfg.output else None
    fingerprint = {"mode": mode, "n_items": int(n_items), "steps": cfg.steps, "batch_size": cfg.batch_size,
                   "learning_rate": cfg.learning_rate, "seed": cfg.seed, "ttt_steps": cfg.ttt_steps,
                   "head": head.config.to_json()["taps"], "vocab": len(head.config.token_ids)}
    if spec.feature_noise:  # (absent when 0, so runs from before the option still resume)
        fingerprint["feature_noise"] = spec.feature_noise
    noise_base = jax.random.fold_in(jax.random.key(cfg.seed), 0x6E6F)  # noise of step s: fold_in(noise_base, s)
    if cfg.output:
        os.makedirs(cfg.output, exist_ok=True)
        existing = ckpt.latest_checkpoint(cfg.output)
        if cfg.resume and existing is None:
            raise FileNotFoundError(f"resume: {ckpt.checkpoint_dir(cfg.output)} holds no checkpoint; drop --resume "
                                    "to start a new run")
        if not cfg.resume and existing is not None:
            raise FileExistsError(f"{cfg.output} already holds a run ({existing}); resume it or choose another "
                                  "output folder")
        if cfg.resume:
            meta = ckpt.read_meta(existing)
            if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                raise ckpt.CheckpointMismatch(f"{existing} was written by a different head run "
                                              f"({meta.get('fingerprint')} != {fingerprint})")
            params, opt_state, rng_key, start, _ = ckpt.restore_checkpoint(existing, params, opt_state, rng_key)
        kept = []
        if cfg.resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    last = cfg.stop_after if cfg.stop_after is not None else cfg.steps
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"head {mode}", dynamic_ncols=True)

    def items(step: int) -> np.ndarray:
        """The items of `step` (0-based): a fixed function of (seed, step), so a resumed run sees the same data."""
        pos = np.arange(step * per_batch, (step + 1) * per_batch)
        epochs = pos // n_items
        out = np.empty(per_batch, np.int64)
        for e in np.unique(epochs):
            perm = epoch_permutation(n_items, cfg.seed, int(e))
            out[epochs == e] = perm[pos[epochs == e] % n_items]
        return out

    t0 = time.time()
    for step in range(start, last):
        pick = items(step)
        idx = pairs[pick].reshape(-1) if mode == "dpo" else pick
        batch = _batch(fs, idx, extra)
        if spec.feature_noise:
            batch["noise_key"] = jax.random.fold_in(noise_base, step)  # a function of (seed, step): resume is exact
        params, opt_state, met = step_fn(params, opt_state, batch, embed, rows)
        if (step + 1) % cfg.log_every == 0 or step + 1 == last:
            row = {"step": step + 1, "time_s": round(time.time() - t0, 1),
                   **{k: round(float(v), 5) for k, v in met.items()}}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"step {step + 1}: the loss is {row['loss']}; lower the learning rate")
            log.append(row)
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.set_postfix({k: v for k, v in row.items() if k in ("loss", "alpha_1", "alpha_2", "dpo",
                                                                         "reward_accuracy")})
        if bar is not None:
            bar.update(1)
        if eval_set is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            cur = dataclasses.replace(head, state=params)
            acc = evaluate_acceptance(target, cur, eval_set, steps=cfg.ttt_steps, temperature=cfg.temperature)
            row = {"step": step + 1, "eval_alpha": [round(a, 4) for a in acc]}
            log.append(row)
            print(json.dumps(row), flush=True)
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if cfg.output and (step + 1 == last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            ckpt.save_checkpoint(cfg.output, step + 1, params, opt_state, rng_key, (step + 1) * per_batch,
                                 {"fingerprint": fingerprint}, keep=2)
    if bar is not None:
        bar.close()
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(params)).items()}
    return from_flat(head.config, flat, source=f"{head.source} + {mode}"), log


def _reference_logps(target, reference: FeatureDraft, fs: FeatureSet, dv: np.ndarray, batch_size: int):
    embed, rows = target_tables(target, reference)
    out = np.zeros(len(fs), np.float32)
    for s in range(0, len(fs), batch_size):
        idx = np.arange(s, min(s + batch_size, len(fs)))
        pad = batch_size - len(idx)
        idx_p = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
        lp = _ref_logps(reference.graphdef, reference.state, _batch(fs, idx_p, {"dvocab_index": dv}), embed, rows)
        out[idx] = np.asarray(lp)[:len(idx)]
    return out


@functools.partial(jax.jit, static_argnums=0)
def _ref_logps(graphdef, params, batch, embed_table, out_rows):
    return response_logps(nnx.merge(graphdef, params), batch, embed_table, out_rows, 1)[0]


# ----------------------------------------------------------------------------------------------------------------
# Recipes (`rss-jax train head-distill | head-dpo`)
# ----------------------------------------------------------------------------------------------------------------


def records_from_jsonl(path: str, kind: str, tokenizer, vocab_size: int, max_length: int) -> list[dict]:
    """A JSONL file of `prompt`/`prompt_ids` with `response`(`_ids`) (kind "sft") or `chosen`/`rejected` (kind
    "dpo") -> prompt/response id records (for "dpo": chosen then rejected, alternating)."""
    from training.data import encode_records, read_jsonl, truncate
    out = []
    for prompt, responses in encode_records(read_jsonl(path), kind, path, tokenizer, True, vocab_size):
        for resp in responses:
            p, r = truncate(prompt, resp, max_length)
            out.append({"prompt_ids": p, "response_ids": r})
    return out


def run_recipe(args) -> dict:
    """`rss-jax train head-distill` / `head-dpo` from parsed arguments; returns a summary dict."""
    import rss_jax
    from training.draft import frequent_token_ids
    target = rss_jax.load(args.target)
    if getattr(target, "is_feature_head", False):
        raise ValueError(f"--target {args.target!r} is a feature-draft head; pass the full model it drafts for")
    output = os.path.abspath(args.output)
    cfg = HeadTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          warmup=args.warmup_steps if args.warmup_steps is not None else max(args.steps // 10, 1),
                          seed=args.seed, ttt_steps=args.ttt_steps, temperature=args.temperature,
                          tv_weight=getattr(args, "tv_weight", 0.0), beta=getattr(args, "beta", 0.1),
                          consistency=getattr(args, "consistency", 1.0),
                          feature_noise=getattr(args, "feature_noise", 0.0), output=output, save_every=args.save_every,
                          resume=args.resume, stop_after=args.stop_after, progress=args.progress,
                          eval_every=getattr(args, "eval_every", 0))
    kind = "dpo" if args.train_mode == "head-dpo" else "sft"
    records = records_from_jsonl(args.data, kind, target.tokenizer, target.config.vocab_size, args.max_length)
    if args.train_mode == "head-distill":
        if args.init:
            head = rss_jax.load(args.init)
            if not getattr(head, "is_feature_head", False):
                raise ValueError(f"--init {args.init!r} is not a feature-draft head folder; give the folder a head "
                                 "was saved to (`rss-jax train head-distill` writes OUTPUT/final)")
            if args.depth is not None:
                head = rss_jax.heads.deepen(head, args.depth, seed=args.seed)
        else:
            taps = tuple(int(t) for t in args.taps.split(",")) if args.taps else None
            ids = None
            if args.vocab:
                ids = frequent_token_ids([r["response_ids"] for r in records], args.vocab,
                                         always=target.eos_token_ids)
            head = rss_jax.heads.new_head(target, taps=taps, token_ids=ids, seed=args.seed, depth=args.depth or 1)
        reference, pairs = None, None
    else:
        reference = rss_jax.load(args.sft)
        if not getattr(reference, "is_feature_head", False):
            raise ValueError(f"--sft {args.sft!r} is not a feature-draft head folder; give the SFT head's folder "
                             "(`rss-jax train head-distill` writes OUTPUT/final)")
        head = reference
        pairs = np.arange(len(records)).reshape(-1, 2)
    head.check_target(target)
    width = -(-max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records) // 16) * 16
    fs = extract_features(target, records, head.config.taps, args.temperature, width=width,
                          batch_size=args.batch_size, progress=args.progress)
    eval_set = None
    if getattr(args, "eval_data", None):
        ev = records_from_jsonl(args.eval_data, "sft", target.tokenizer, target.config.vocab_size, args.max_length)
        ew = -(-max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in ev) // 16) * 16
        eval_set = extract_features(target, ev, head.config.taps, args.temperature, width=ew,
                                    batch_size=args.batch_size, progress=args.progress)
    mode = "dpo" if args.train_mode == "head-dpo" else "distill"
    trained, log = train_head(target, head, fs, cfg, mode=mode, reference=reference, pairs=pairs,
                              eval_set=eval_set)
    last = cfg.stop_after if cfg.stop_after is not None else cfg.steps
    final = None
    if last == cfg.steps:
        final = trained.save(os.path.join(output, "final"), overwrite=True)
    summary = {"step": last, "loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
               "final": final, "metrics": os.path.join(output, "metrics.jsonl")}
    if eval_set is not None:
        summary["eval_alpha"] = evaluate_acceptance(target, trained, eval_set, steps=max(cfg.ttt_steps, 1),
                                                    temperature=cfg.temperature)
    return summary
