"""The decoding loops as pure, jittable functions: put our sampler inside your own `jax.jit`, `jax.vmap` or
`shard_map`.

`rss_jax.generate` is a host wrapper over these functions (tokenising, padding to a bucket, compiling once per
shape, statistics). Here nothing happens on the host: every function takes pytrees (a model's NNX `graphdef`, static,
and its `state`), token arrays, per-row lengths and a typed PRNG key, plus one frozen, hashable config dataclass
(static under jit), and returns arrays.

    import jax, rss_jax as rj
    from rss_jax import engine
    lm = rj.load("smollm2-135m-instruct")
    cfg = engine.ar_config(lm, max_new_tokens=32, temperature=0.8)
    tokens, lengths = engine.pad_prompts(engine.encode(lm, ["Hello!"]))
    run = jax.jit(engine.decode, static_argnums=(0, 1))
    out = run(lm.graphdef, cfg, lm.state, tokens, lengths, jax.random.key(0))   # out.tokens [1, 32]

With the same padding, key and row ids, `decode` gives `rj.generate(method="ar")`'s tokens and `speculative` gives
`rj.generate(method="sd" | "sss" | "eft")`'s, token for token. A row's samples are keyed by (key, row id, the number
of tokens the row has emitted), so they do not depend on the batch a row is in; pass `row_ids` to place rows of
several calls in one numbering (rj.generate's `prompt_offset`).

Shapes: B rows, P prompt slots (right-padded), N = cfg.max_new_tokens, V vocabulary, K draft tokens per block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rss_jax.decoding import autoregressive, common, speculative
from rss_jax.decoding.autoregressive import SamplerConfig as ARConfig
from rss_jax.decoding.speculative import SpecConfig

__all__ = ["ARConfig", "SpecConfig", "DecodeResult", "SpecResult", "ar_config", "spec_config", "encode",
           "pad_prompts", "prefill", "decode", "speculative_decode"]


@struct.dataclass
class DecodeResult:
    """tokens [B, N] int32 (-1 after a row's end; a final EOS is included), lengths [B] int32 (tokens per row),
    steps: int32 scalar (decode steps run, the prefill's sample included)."""
    tokens: jax.Array
    lengths: jax.Array
    steps: jax.Array


@struct.dataclass
class SpecResult:
    """tokens [B, N] int32 and lengths [B] as for `DecodeResult`; blocks: int32 scalar (target forwards of the
    batch); stats: per-row arrays: ``blocks`` [B] (blocks the row took part in), ``accepted`` [B] (draft tokens
    accepted), ``hist`` [B, K+1] (blocks that accepted 0..K drafts), ``bonus`` [B], ``empty`` [B] (empty residuals),
    and for SSS ``c_sum`` / ``c_count`` [B] (the shift's normaliser, summed)."""
    tokens: jax.Array
    lengths: jax.Array
    blocks: jax.Array
    stats: dict


def ar_config(lm, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None, min_p=None,
              eos=None) -> ARConfig:
    """The static config of `decode` for model `lm` (validated; eos=None: the model's EOS ids, [] never stops)."""
    return autoregressive.sampler_config(lm, max_new_tokens, temperature, top_k, top_p, min_p, eos)


def spec_config(lm, method: str, draft, sft=None, k: int = 4, mode: str = "exact", shift: float = 1.0,
                max_new_tokens: int = 128, temperature: float = 1.0, top_k=None, top_p=None, min_p=None,
                draft_top_k=None, draft_top_p=None, eos=None, draft_temperature=None) -> SpecConfig:
    """The static config of `speculative_decode` ("sd" with `draft`; "sss" and "eft" with the aligned `draft` and
    its `sft`), validated against the models as `rj.generate` validates them."""
    from rss_jax.decoding import MODES
    if method not in ("sd", "sss", "eft"):
        raise ValueError(f"unknown speculative method {method!r}; choose sd, sss or eft")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    base = ar_config(lm, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    return speculative.spec_config(lm, base, method, draft, sft, k, mode, shift, draft_top_k, draft_top_p,
                                   draft_temperature)


def encode(lm, prompts, chat: bool = True) -> list[list[int]]:
    """Strings (through the chat template when chat=True) or lists of token ids -> validated lists of ids."""
    return common.encode_prompts(lm, prompts, chat)


def pad_prompts(prompt_ids, width: int | None = None, pad: int = 0):
    """Lists of ids -> (tokens [B, P] int32 right-padded, lengths [B] int32); P defaults to rj.generate's bucket
    (the next power of two, at least 16), which is what makes results equal to rj.generate's."""
    longest = max(len(p) for p in prompt_ids)
    width = common.bucket(longest) if width is None else int(width)
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    return common.pad_prompts(prompt_ids, width, pad)


def prefill(graphdef, state, tokens, lengths, capacity: int):
    """Write right-padded prompts tokens [B, P] (lengths [B]) into a fresh KV cache of `capacity` slots.
    Returns (logits [B, V] float32 at each row's last prompt token, KVCache [L, B, capacity, KVH, D])."""
    return autoregressive.prefill(nnx.merge(graphdef, state), tokens, lengths, capacity)


def _row_ids(tokens, row_ids):
    return jnp.arange(tokens.shape[0], dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)


def decode(graphdef, cfg: ARConfig, state, tokens, lengths, key, row_ids=None) -> DecodeResult:
    """Plain decoding: prefill, then one lax.while_loop until every row has emitted cfg.max_new_tokens tokens or
    an EOS. tokens [B, P], lengths [B], key: a typed PRNG key (`jax.random.key(seed)`), row_ids [B] (default
    0..B-1). `graphdef` and `cfg` are static."""
    out, steps = autoregressive.ar_loop(graphdef, cfg, state, tokens, lengths, _row_ids(tokens, row_ids),
                                        _check_key(key))
    return DecodeResult(tokens=out, lengths=jnp.sum(out >= 0, axis=1).astype(jnp.int32), steps=steps)


def speculative_decode(graphdefs: tuple, cfg: SpecConfig, states: tuple, tokens, lengths, key,
                       row_ids=None) -> SpecResult:
    """Speculative decoding (SD), reward-shifted speculative sampling (SSS) or EFT in one lax.while_loop over
    blocks. graphdefs = (target, draft, sft) and states likewise (sft None for SD); drafts are separate models or
    feature-draft heads of the target. tokens [B, P], lengths [B] (prompts of at least 2 tokens with heads), key a
    typed PRNG key, row_ids [B]. `graphdefs` and `cfg` are static."""
    gd_t, gd_d, gd_s = graphdefs
    st_t, st_d, st_s = states
    if not cfg.three_models:
        gd_s, st_s = None, None
    out, st, it = speculative.spec_loop(gd_t, gd_d, gd_s, cfg, st_t, st_d, st_s, tokens, lengths,
                                        _row_ids(tokens, row_ids), _check_key(key))
    return SpecResult(tokens=out, lengths=jnp.sum(out >= 0, axis=1).astype(jnp.int32), blocks=it, stats=st)


def _check_key(key):
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a typed PRNG key: jax.random.key(seed), not jax.random.PRNGKey")
    return key

