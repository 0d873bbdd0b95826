"""Feature-draft heads as loadable objects: make one for a target, save it, load it (`rss_jax.load` reads them).

A saved head is a folder with `rss_jax.json` (format, kind "feature_head", the HeadConfig naming its target) and
`head.safetensors` (only the head's own weights: the token embeddings and output rows are the target's). The folder
is written under a temporary name and renamed, so an interrupted save leaves nothing that looks like a head.

    head = rss_jax.heads.new_head(lm, taps=(2, 15, 27), token_ids=ids)   # warm start from the target's last layer
    head.save("my-head")
    head = rss_jax.load("my-head")                                        # a FeatureDraft
    out = rss_jax.generate(lm, prompts, method="sd", draft=head)
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax.loading.names import CheckpointError, flatten, unflatten
from rss_jax.loading.orbax_io import MARKER, atomic_folder
from rss_jax.models.feature_head import HeadConfig, HeadTargetMismatch, abstract_head, init_head, num_params
from rss_jax.report import public_mode
from rss_jax.sampling import optional_positive

WEIGHTS = "head.safetensors"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "heads")
# built-in heads shipped in the package: name -> folder under rss_jax/assets/heads
BUILTIN_HEADS = {
    "smollm2-135m-instruct-head-sft": "smollm2-135m-instruct-sft",
    "smollm2-135m-instruct-head-aligned": "smollm2-135m-instruct-aligned",
}


def resolve_builtin_head(name: str) -> str | None:
    """The folder of a built-in head name, or None when `name` is not one."""
    if name not in BUILTIN_HEADS:
        return None
    path = os.path.join(ASSETS, BUILTIN_HEADS[name])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"built-in head {name!r}: {path} is missing from this installation; reinstall "
                                "rss_jax or re-make the heads with `make drafts`")
    return path
KIND = "feature_head"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_temperature_scale(value) -> float | None:
    """A head's draft_temperature_scale: None, or a finite number > 0 (a bad one names itself)."""
    return optional_positive(value, "draft_temperature_scale", "draft at the target's temperature")


@dataclasses.dataclass
class FeatureDraft:
    """A feature-draft head: `config` (HeadConfig), NNX `graphdef` + `state`. It drafts for the target named by
    `config.target` and takes that target's embeddings and output rows at decode time."""
    config: HeadConfig
    graphdef: object
    state: object
    source: str = ""
    dtype: str = "float32"
    tokenizer: object = None  # heads share their target's tokenizer; they carry none
    quantize: str | None = None  # "int8" after `quantized("int8")` / `rss_jax.load(..., quantize="int8")`
    # the proposal temperature this head drafts best at, as a fraction of the sampling temperature (measured in
    # closed form on held-out responses, `training.heads.calibrate_proposal`); None: draft at the target's. SD and
    # exact SSS sample their proposal at draft_temperature_scale * temperature unless given draft_temperature; the
    # output law does not change (q is what the drafts were sampled from), only how often drafts are accepted
    draft_temperature_scale: float | None = None
    is_feature_head = True

    def __post_init__(self):
        self.draft_temperature_scale = check_temperature_scale(self.draft_temperature_scale)

    def quantized(self, kind: str = "int8") -> "FeatureDraft":
        """An int8 weight-only copy of the head (`FeatureHead.quantize_int8`), for decoding."""
        from rss_jax.lm import quantize_lm
        return quantize_lm(self, kind)

    @property
    def module(self):
        return nnx.merge(self.graphdef, self.state)

    @property
    def vocab_size(self) -> int:
        return self.config.target_vocab_size

    @property
    def num_params(self) -> int:
        return num_params(self.config)

    def params(self) -> dict:
        return flatten(nnx.to_pure_dict(self.state))

    def replicate(self, mesh) -> "FeatureDraft":
        """The same head with every weight replicated over `mesh` (a head is a few million parameters; the target's
        features it reads arrive sharded like the target's batch)."""
        from rss_jax import sharding
        host = {k: np.asarray(v) for k, v in sharding.to_host(self.params()).items()}
        state = jax.tree.map(lambda x: x, self.state)
        nnx.replace_by_pure_dict(state, unflatten({k: sharding.place(v, sharding.replicated(mesh))
                                                   for k, v in host.items()}))
        return dataclasses.replace(self, state=state)

    def check_target(self, lm) -> None:
        """Raise HeadTargetMismatch when `lm` is not the target this head was made for."""
        self.config.check_target(lm.config, what=f"the target {getattr(lm, 'source', '')!r}")

    def save(self, path: str, overwrite: bool = False, dtype: str = "float32") -> str:
        """Write the head folder; `dtype` ("float32" or "float16") is the stored precision."""
        from safetensors.numpy import save_file
        if self.quantize:
            raise ValueError(f"this head was quantised to {self.quantize} for decoding and saves only in float; save "
                             f"the head loaded without quantize=, and pass quantize={self.quantize!r} when loading it")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"a head is stored as float32 or float16, not {dtype!r}")
        path = os.path.abspath(path)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        from rss_jax.sharding import to_host
        flat = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(dtype))
                for k, v in to_host(self.params()).items()}
        with atomic_folder(path) as tmp:
            save_file(flat, os.path.join(tmp, WEIGHTS))
            public_mode(os.path.join(tmp, WEIGHTS))
            meta = {"format": 1, "kind": KIND, "config": self.config.to_json()}
            if self.draft_temperature_scale is not None:
                meta["draft_temperature_scale"] = self.draft_temperature_scale
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump(meta, f, indent=1)
        return path

    def __repr__(self):
        c = self.config
        scale = "" if self.draft_temperature_scale is None else \
            f", draft_temperature_scale={self.draft_temperature_scale:g}"
        return (f"FeatureDraft(taps={list(c.taps)}, layers={c.depth}, vocab={len(c.token_ids)} of "
                f"{c.target_vocab_size}, target={c.target_model_type or c.target_family} x{c.target_num_layers}"
                f"{scale}, source={self.source!r})")


def is_head_folder(path: str) -> bool:
    marker = os.path.join(path, MARKER)
    if not (os.path.isdir(path) and os.path.exists(marker)):
        return False
    try:
        with open(marker) as f:
            return json.load(f).get("kind") == KIND
    except (OSError, json.JSONDecodeError):
        return False


def from_flat(config: HeadConfig, flat: dict, dtype: str = "float32", source: str = "") -> FeatureDraft:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    graphdef, abstract = nnx.split(abstract_head(config, _DTYPES[dtype]))
    want = flatten(nnx.to_pure_dict(abstract))
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise CheckpointError(f"{source or 'head'}: weights do not match the head's description "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for k, spec in want.items():
        if tuple(np.shape(flat[k])) != tuple(spec.shape):
            raise CheckpointError(f"{source or 'head'}: tensor {k!r} has shape {tuple(np.shape(flat[k]))}, the "
                                  f"head's description says {tuple(spec.shape)}")
    arrays = {k: jnp.asarray(np.asarray(v, np.float32), dtype=_DTYPES[dtype]) for k, v in flat.items()}
    nnx.replace_by_pure_dict(abstract, unflatten(arrays))
    return FeatureDraft(config=config, graphdef=graphdef, state=abstract, source=source, dtype=dtype)


def read_description(path: str) -> tuple[HeadConfig, float | None]:
    """(HeadConfig, draft_temperature_scale) from a head folder's rss_jax.json, without its weights; a broken
    description is a CheckpointError naming the file."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            meta = json.load(f)
        return HeadConfig.from_json(meta["config"]), check_temperature_scale(meta.get("draft_temperature_scale"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{marker}: corrupt feature-head description ({type(e).__name__}: {e})") from e


def load_head(path: str, dtype: str = "float32") -> FeatureDraft:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    config, scale = read_description(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{path}: the head's weights {WEIGHTS} are missing; save the head again")
    try:
        flat = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({e}); save the head again") \
            from e
    head = from_flat(config, flat, dtype=dtype, source=os.path.abspath(path))
    head.draft_temperature_scale = scale
    return head


def new_head(target, taps=None, token_ids=None, seed: int = 0, warm_start: bool = False,
             depth: int = 1) -> FeatureDraft:
    """A fresh head for `target` (an LM). taps: target layer indices (default: a low, a middle and a high layer);
    token_ids: the draft vocabulary (default: the full vocabulary); depth: the head's decoder layers. The default is
    a random head (std 0.02), as the shipped heads started. With `warm_start` (Llama-family targets) the first
    decoder layer starts as a copy of the target's last layer, the output norm as the target's final norm, and the
    input map passes the fused feature through (an option for experiments; the shipped heads did not use it)."""
    cfg = target.config
    if taps is None:
        n = cfg.num_layers
        taps = sorted({min(2, n - 1), n // 2, max(n - 3, 0)})
    if token_ids is None:
        token_ids = range(cfg.vocab_size)
    hcfg = HeadConfig.for_target(cfg, taps, token_ids, depth=depth)
    hcfg.check_target(cfg)
    module = init_head(hcfg, seed, jnp.float32)
    flat = flatten(nnx.to_pure_dict(nnx.state(module)))
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if warm_start and cfg.family == "llama" and not cfg.qkv_bias:
        from rss_jax.lm import refuse_quantized
        refuse_quantized(target, "the target of a warm-started head")
        tp = {k: np.asarray(v, np.float32) for k, v in target.params().items()}
        last = cfg.num_layers - 1
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"):
            flat[name] = tp[f"layers.{name}"][last]
        flat["out_norm"] = tp["norm"]
        e = cfg.hidden_size
        flat["in_proj"] = np.concatenate([flat["in_proj"][:e] * 0.5, np.eye(e, dtype=np.float32)], axis=0)
        if "fuse_w" in flat:
            n = len(hcfg.taps)
            flat["fuse_w"] = np.concatenate([flat["fuse_w"][: (n - 1) * e] * 0.5, np.eye(e, dtype=np.float32)], 0)
    return from_flat(hcfg, flat, source=f"new head for {target.source}")


def deepen(head: FeatureDraft, depth: int, seed: int = 0) -> FeatureDraft:
    """`head` with decoder layers appended up to `depth`, computing exactly what `head` computes: each new layer is
    random (std 0.02, from `seed`) except its attention and MLP output maps, which start at zero, so it adds nothing
    to the residual stream until training moves them. The way to give a trained head more capacity without
    starting over."""
    cfg = head.config
    if head.quantize:
        raise ValueError("deepen a float head: this one was quantised for decoding; load it without quantize=")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < cfg.depth:
        raise ValueError(f"depth must be an integer >= the head's depth {cfg.depth}, got {depth!r}: a head can be "
                         "deepened, not cut")
    if depth == cfg.depth:
        return head
    new_cfg = dataclasses.replace(cfg, depth=int(depth))
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(nnx.to_pure_dict(nnx.state(
        init_head(new_cfg, seed, jnp.float32)))).items()}
    from rss_jax.sharding import to_host
    flat.update({k: np.asarray(v, np.float32) for k, v in to_host(head.params()).items()})
    for layer in range(cfg.depth, depth):
        for name in ("wo", "w_down"):
            flat[f"block{layer}.{name}"] = np.zeros_like(flat[f"block{layer}.{name}"])
    deep = from_flat(new_cfg, flat, dtype=head.dtype, source=f"{head.source} deepened to {depth} layers")
    deep.draft_temperature_scale = head.draft_temperature_scale  # it computes the same logits
    return deep


__all__ = ["FeatureDraft", "HeadConfig", "HeadTargetMismatch", "deepen", "load_head", "new_head", "is_head_folder"]
