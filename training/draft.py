"""Draft construction: a shallower copy of a target model that keeps its embeddings, final norm and head."""
from __future__ import annotations

import dataclasses

import numpy as np

from rss_jax.lm import LM, from_params, refuse_quantized


def parse_layers(spec: str) -> list[int]:
    """"0-3,7,29" -> [0, 1, 2, 3, 7, 29]."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def make_draft(target: LM, layers, dtype: str | None = None) -> LM:
    """An LM with the target's embeddings, final norm, head (tied or not), tokenizer and the layers `layers` (indices
    into the target's stack, in the order given) — the usual starting point for a draft of a model that has no smaller
    sibling. `layers` may be a list of ints or a spec string such as "0-3,29"."""
    refuse_quantized(target, "the target")
    if isinstance(layers, str):
        layers = parse_layers(layers)
    layers = [int(i) for i in layers]
    n = target.config.num_layers
    if not layers:
        raise ValueError("make_draft needs at least one layer")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} are outside the target's {n} layers (0..{n - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer indices repeat: {layers}")
    idx = np.asarray(layers)
    flat = {k: (np.asarray(v)[idx] if k.startswith("layers.") else np.asarray(v)) for k, v in target.params().items()}
    config = dataclasses.replace(target.config, num_layers=len(layers))
    return from_params(config, flat, target.tokenizer, dtype=dtype or target.dtype,
                       source=f"{target.source}[layers {layers}]")


def frequent_token_ids(sequences, size: int, always=()) -> list[int]:
    """The `size` most frequent ids over `sequences` (lists of token ids; ties to the lower id), plus `always`
    (e.g. EOS and chat-template tokens), sorted: the vocabulary of a trimmed draft head."""
    size = int(size)
    if size < 1:
        raise ValueError(f"a draft vocabulary needs at least one token, got size={size}")
    counts: dict[int, int] = {}
    for seq in sequences:
        for t in seq:
            t = int(t)
            if t >= 0:
                counts[t] = counts.get(t, 0) + 1
    keep = {int(t) for t in always}
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= size:
            break
        keep.add(t)
    return sorted(keep)


def draft_vocabulary(sequences, size: int, always=()) -> list[int]:
    """A trimmed head's vocabulary from sample text: half the ids by frequency in `sequences`, the rest the lowest
    ids not yet taken (BPE tokenizers number tokens in merge order, so low ids are the frequent tokens of the
    tokenizer's own corpus: a small sample alone ranks the long tail badly), plus `always`."""
    ids = set(frequent_token_ids(sequences, max(1, int(size) // 2), always))
    low = 0
    while len(ids) < int(size):
        ids.add(low)
        low += 1
    return sorted(ids)


def trim_vocab(lm: LM, token_ids) -> LM:
    """A copy of `lm` whose output head scores only `token_ids` (plus the model's EOS ids, always kept so that
    generation can stop): the head's rows are the corresponding rows of the current head; every other token gets
    logit -inf. A draft with a trimmed head costs much less per step when the head is a large share of it (SmolLM2's
    49152 x 576 head is 28M of 135M parameters). Speculative decoding stays exact for the target (the draft simply
    never proposes the other tokens); for SSS / EFT the aligned target p~ = p_ref * pi_r / pi_sft is zero outside
    the drafts' shared vocabulary."""
    refuse_quantized(lm)
    cfg = lm.config
    ids = sorted({int(t) for t in token_ids} | {int(t) for t in lm.eos_token_ids if int(t) < cfg.vocab_size})
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary of {cfg.vocab_size}")
    if not ids:
        raise ValueError("trim_vocab needs at least one token id")
    flat = {k: np.asarray(v) for k, v in lm.params().items()}
    head = lm.module
    if cfg.head_token_ids:  # re-trimming a trimmed head: only ids it already scores have rows
        old = {t: i for i, t in enumerate(cfg.head_token_ids)}
        missing = [t for t in ids if t not in old]
        if missing:
            raise ValueError(f"{len(missing)} requested ids (e.g. {missing[:5]}) are not in the trimmed head")
        rows = np.asarray(flat["head_rows"])[[old[t] for t in ids]]
    else:
        w = np.asarray(head.head_weight())
        rows = (w.T if head.head_transposed else w)[np.asarray(ids)]
    flat.pop("lm_head", None)
    flat["head_rows"] = rows
    config = dataclasses.replace(cfg, head_token_ids=tuple(ids))
    return from_params(config, flat, lm.tokenizer, dtype=lm.dtype, source=f"{lm.source}[head {len(ids)} tokens]")
