"""Draft construction: a shallower copy of a target model that keeps its embeddings, final norm and head."""
from __future__ import annotations

import dataclasses

import numpy as np

from rss_jax.lm import LM, from_params


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
