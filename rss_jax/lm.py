"""`rss_jax.load`: a ready model from any supported source, and the LM object the decoding functions take."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rss_jax import loading, sharding
from rss_jax.loading.names import flatten, unflatten
from rss_jax.models import abstract_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.partial(jax.jit, static_argnums=0)
def _uncached_logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


@dataclasses.dataclass
class LM:
    """A loaded causal LM: `config`, NNX `graphdef` + `state` (split at the jit boundary), `tokenizer` (or None)."""
    config: object
    graphdef: object
    state: object
    tokenizer: object = None
    source: str = ""
    dtype: str = "float32"
    quantize: str | None = None  # "int8" after `rss_jax.load(..., quantize="int8")`

    @property
    def mesh(self):
        """The mesh the weights live on (None on one device)."""
        return sharding.mesh_of(self.state)

    @property
    def module(self):
        return nnx.merge(self.graphdef, self.state)

    @property
    def vocab_size(self) -> int:
        """Size of the shared token space: the tokenizer's when there is one, else the embedding rows."""
        return len(self.tokenizer) if self.tokenizer is not None else self.config.vocab_size

    @functools.cached_property
    def eos_token_ids(self) -> tuple:
        """The config's EOS ids plus the tokenizer's EOS and the chat end-of-turn tokens it knows (computed once)."""
        ids = list(self.config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None:
            vocab = tok.get_vocab()
            for t in (tok.eos_token_id, vocab.get("<|im_end|>"), vocab.get("<|eot_id|>")):
                if t is not None and int(t) not in ids:
                    ids.append(int(t))
        return tuple(ids)

    def logits(self, tokens) -> jax.Array:
        """The reference forward: tokens [B, T] (ids) -> logits [B, T, V] float32, no cache."""
        tokens = jnp.asarray(np.asarray(tokens, dtype=np.int32))
        if tokens.ndim == 1:
            tokens = tokens[None]
        mesh = self.mesh
        if mesh is None:
            return _uncached_logits(self.graphdef, self.state, tokens)
        with jax.set_mesh(mesh):
            out = _uncached_logits(self.graphdef, self.state, sharding.to_global(tokens, mesh)
                                   if jax.process_count() > 1 else tokens)
        return sharding.to_host(out)

    def params(self) -> dict:
        """Flat {path: array} view of the parameters."""
        return flatten(nnx.to_pure_dict(self.state))

    def save(self, path: str, overwrite: bool = False) -> str:
        """Write an Orbax folder that `rss_jax.load` reads back without re-conversion."""
        if self.quantize:
            raise ValueError(f"this model was quantised to {self.quantize} at load time and saves only in float; "
                             f"save the model loaded without quantize=, and pass quantize={self.quantize!r} when "
                             "loading it")
        flat = {k: np.asarray(v, dtype=np.float32) for k, v in sharding.to_host(self.params()).items()}
        return loading.orbax_io.save(path, self.config, flat, self.tokenizer, overwrite=overwrite)

    def __repr__(self):
        c = self.config
        return (f"LM({c.model_type or c.family}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"vocab={c.vocab_size}, dtype={self.dtype}{', ' + self.quantize if self.quantize else ''}, "
                f"source={self.source!r})")


def from_params(config, flat: dict, tokenizer=None, dtype="float32", mesh=None, source="",
                rules=sharding.DEFAULT_RULES) -> LM:
    """Assemble an LM from a config and a flat {path: array} parameter dict (on `mesh` by `rules` when given)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    jdtype = DTYPES[dtype]
    graphdef, abstract = nnx.split(abstract_model(config, jdtype))
    if mesh is not None:  # every process copies only its own shards of each host array onto its devices
        arrays = sharding.shard_params(config, flat, mesh, rules, dtype=jdtype)
    else:
        arrays = {k: jnp.asarray(v, dtype=jdtype) for k, v in flat.items()}
    nnx.replace_by_pure_dict(abstract, unflatten(arrays))
    return LM(config=config, graphdef=graphdef, state=abstract, tokenizer=tokenizer, source=source, dtype=dtype)


QUANTIZE = (None, "int8")


def refuse_quantized(model, what: str = "the model") -> None:
    """Raise a clear ValueError when `model` (an LM or a head) holds int8 weights: training and draft building need
    the float weights."""
    q = getattr(model, "quantize", None)
    if q:
        name = getattr(model, "source", "") or ""
        raise ValueError(f"{what} {name!r} was loaded with quantize={q!r}, which is for decoding only; load it "
                         "without quantize= to train it or to build a draft from it")


def quantize_lm(lm, kind: str = "int8"):
    """An int8 weight-only copy of an LM or a FeatureDraft (its module's `quantize_int8`: for a model the layer
    matrices, token table and output head, int8 with one scale per group of 32 input weights of each output
    channel; everything else keeps its dtype). One device only."""
    if kind not in QUANTIZE or kind is None:
        raise ValueError(f"quantize must be 'int8' or None, got {kind!r}")
    if isinstance(lm, LM) and lm.mesh is not None:
        raise ValueError("int8 quantisation runs on one device; load without mesh= to quantise, or without "
                         "quantize= to shard the model")
    model = nnx.merge(lm.graphdef, lm.state)
    model.quantize_int8()
    graphdef, state = nnx.split(model)
    return dataclasses.replace(lm, graphdef=graphdef, state=state, quantize=kind)


def load(source: str, dtype: str = "float32", mesh=None, rules=sharding.DEFAULT_RULES,
         quantize: str | None = None) -> LM:
    """Load a model from a Hugging Face folder (safetensors), a .gguf file, an rss_jax Orbax folder or a built-in name
    such as "smollm2-135m-instruct". Weights are converted to `dtype` ("float32" or "bfloat16").
    A feature-draft head folder (`FeatureDraft.save`) or a built-in head name ("smollm2-135m-instruct-head-sft",
    "smollm2-135m-instruct-head-aligned") gives a `rss_jax.heads.FeatureDraft`.

    With `mesh` (`rss_jax.sharding.make_mesh`) each weight is placed straight into its sharding by its logical axes
    and `rules` (`rss_jax.sharding.Rules`): every process copies only its own shards from the host arrays, and a mesh
    axis that does not divide a dimension it shards raises `rss_jax.sharding.ShardingError`. Feature-draft heads
    (a few million parameters) are replicated over the mesh.

    `quantize="int8"` stores the layer matrices, the token table and the output head as int8 with one scale (in
    `dtype`) per group of 32 input weights of each output channel (weight-only: products widen the weights inside
    the product; on CPU a hand-written kernel, `rss_jax.kernels`, that computes in float32 for up to 64 rows, else
    XLA's product in `dtype`). It applies to models, separate-model drafts and feature-draft heads, on one device;
    the result is for decoding (training and `save` need the float model)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    if quantize is not None and mesh is not None:
        raise ValueError("quantize='int8' runs on one device; drop mesh= to quantise, or quantize= to shard")
    lm = _load(source, dtype, mesh, rules)
    return lm if quantize is None else quantize_lm(lm, quantize)


def _load(source: str, dtype: str, mesh, rules):
    from rss_jax import heads
    source = heads.resolve_builtin_head(os.fspath(source)) or os.fspath(source)
    if heads.is_head_folder(source):  # a feature-draft head (rss_jax.heads.FeatureDraft)
        head = heads.load_head(source, dtype=dtype)
        return head.replicate(mesh) if mesh is not None else head
    if mesh is not None and loading.orbax_io.is_orbax_folder(source):
        # an rss_jax folder restores straight into the mesh layout: each process reads only its own shards
        config = loading.orbax_io.read_config(source)
        targets = loading.flatten_targets(config)
        shardings = sharding.param_shardings(config, {k: v.shape for k, v in targets.items()}, mesh, rules)
        arrays = loading.orbax_io.restore(source, targets, shardings, DTYPES[dtype])
        graphdef, abstract = nnx.split(abstract_model(config, DTYPES[dtype]))
        nnx.replace_by_pure_dict(abstract, unflatten(arrays))
        return LM(config=config, graphdef=graphdef, state=abstract, tokenizer=loading.load_tokenizer(source),
                  source=os.fspath(source), dtype=dtype)
    config, flat, tokenizer, path = loading.load_weights(os.fspath(source))
    return from_params(config, flat, tokenizer, dtype=dtype, mesh=mesh, source=path, rules=rules)
