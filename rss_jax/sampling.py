"""Logit processors and the rejection-sampling primitives of speculative decoding (docs/algorithms.md §1, §2).

Everything here is a pure function of arrays, jittable and vmappable; probabilities and log-probabilities are
computed in float32 whatever the dtype of the incoming logits. Sampling knobs (``temperature``, ``top_k``,
``top_p``, ``min_p``, ``mode``) are static Python values: they select code paths at trace time, so pass them as
static arguments when you ``jax.jit`` a caller.

Shapes: ``V`` vocabulary, ``B`` batch rows, ``K`` draft tokens per block. ``keys`` always holds one PRNG key per
row, shape ``[B]`` (``jax.random.split(jax.random.key(seed), B)``); each row derives its ``K`` acceptance uniforms
from ``fold_in(key, 0)`` and its final sample from ``fold_in(key, 1)``, so rows are independent and reproducible.

Temperature 0 means greedy. A *static* ``temperature == 0`` turns every distribution built here into the one-hot
argmax distribution (first index on ties): ``process_logits`` returns 0 at the argmax and -inf elsewhere, so
``probs_from_logits`` is one-hot and the verify functions below then behave as greedy speculative decoding (a draft
is accepted iff it equals the target argmax; the residual of one-hot p minus one-hot q is one-hot p). Temperature
must not be a traced zero.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "MODES",
    "VerifyResult",
    "validate_sampling_args",
    "apply_temperature",
    "greedy_logits",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "process_logits",
    "probs_from_logits",
    "categorical",
    "sample_token",
    "shifted_logits",
    "sss_target_probs",
    "mean_c",
    "verify_with_target",
    "speculative_verify",
    "sss_verify_with_flags",
    "sss_verify",
]

MODES = ("exact", "paper", "authors_code")

_F32 = jnp.float32
_NEG_INF = -jnp.inf
# Finite stand-in for log(+inf) (a ratio x/0): large enough to dominate any real log-probability, small enough that
# adding, scaling by a moderate shift and dividing by a temperature stays finite in float32 (max ~3.4e38).
_BIG = 1e20


class VerifyResult(NamedTuple):
    """Outcome of verifying one block per row.

    n_accepted:     [B] int32, a = number of leading drafts accepted (0..K).
    next_token:     [B] int32, the residual sample after a rejection (a < K) or the bonus token from row K (a = K);
                    -1 in ``authors_code`` mode when a = K (that rule emits no bonus).
    empty_residual: [B] bool, True iff a < K and the residual was all zero, so the fallback distribution was used
                    (p_a for plain speculative sampling, p~_a for SSS ``paper``); the engine counts these.
    """

    n_accepted: jax.Array
    next_token: jax.Array
    empty_residual: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_static_zero(temperature) -> bool:
    """True when temperature is a Python/NumPy number equal to 0 (the greedy switch)."""
    return _is_real_number(temperature) and float(temperature) == 0.0


def optional_positive(value, name: str, none_means: str) -> float | None:
    """None, or a finite number > 0 returned as float; anything else raises ValueError naming the knob `name` and
    what None means for it."""
    if value is None:
        return None
    if not _is_real_number(value) or not (float(value) > 0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be a finite number > 0 (None: {none_means}), got {value!r}")
    return float(value)


def validate_draft_temperature(value) -> float | None:
    """A proposal temperature (speculative methods' draft_temperature): None (the target's), or a finite number
    > 0, returned as float. Raises ValueError naming the knob otherwise."""
    return optional_positive(value, "draft_temperature", "the target's temperature")


def validate_sampling_args(temperature=1.0, top_k=None, top_p=None, min_p=None) -> None:
    """Raise ValueError with a clear message if a sampling knob is out of range.

    temperature: number >= 0 (0 = greedy); top_k: None or integer >= 1; top_p: None or number in (0, 1];
    min_p: None or number in [0, 1). An array temperature (e.g. traced) is not checked.
    """
    if _is_real_number(temperature):
        t = float(temperature)
        if not (t >= 0.0) or math.isinf(t):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    elif temperature is None or isinstance(temperature, (bool, str, bytes)):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None:
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or int(top_k) < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None:
        if not _is_real_number(top_p) or not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None:
        if not _is_real_number(min_p) or not (0.0 <= float(min_p) < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")


# ----------------------------------------------------------------------------------------------------------------
# Logit processors: [..., V] float32 -> [..., V] float32, removed entries are -inf
# ----------------------------------------------------------------------------------------------------------------


def greedy_logits(logits: jax.Array) -> jax.Array:
    """One-hot argmax in log space: [..., V] -> [..., V] with 0 at the argmax (first on ties), -inf elsewhere."""
    logits = jnp.asarray(logits, _F32)
    best = jnp.argmax(logits, axis=-1)
    hot = jnp.arange(logits.shape[-1]) == best[..., None]
    return jnp.where(hot, jnp.float32(0.0), _NEG_INF)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """logits / temperature in float32, [..., V] -> [..., V].

    temperature > 0 (may be traced). A static 0 returns the greedy limit ``greedy_logits(logits)``.
    """
    logits = jnp.asarray(logits, _F32)
    if _is_static_zero(temperature):
        return greedy_logits(logits)
    return logits / jnp.asarray(temperature, _F32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep exactly the k largest logits per row ([..., V]); ties at the boundary keep the lowest indices."""
    validate_sampling_args(1.0, top_k=k)
    logits = jnp.asarray(logits, _F32)
    k = int(k)
    if k >= logits.shape[-1]:
        return logits
    # Ties at the boundary keep the lowest indices; reductions over lax.top_k's outputs, never a slice or gather of
    # them (XLA CPU then rewrites TopK as a full sort of the vocabulary, ~9 ms per 49k-token row instead of ~0.1 ms).
    # k + 1 candidates: the (k+1)-th tells whether a row has a tie at the boundary without a pass over the row.
    return _keep_first_n(logits, jax.lax.top_k(logits, k + 1)[0], jnp.int32(k))


_TOP_P_CANDIDATES = 256  # top_p looks at this many largest logits first and sorts the whole row only if needed


def _keep_first_n(logits: jax.Array, cand: jax.Array, n: jax.Array) -> jax.Array:
    """Keep the n largest logits per row (ties: lowest indices), given `cand` = lax.top_k(logits, m)[0] with
    1 <= n <= m. Only reductions over the top_k outputs (see top_k_filter)."""
    m = cand.shape[-1]
    nth = jnp.min(jnp.where(jnp.arange(m) < n, cand, jnp.inf), axis=-1, keepdims=True)
    # the (n+1)-th largest logit (equal to nth where n = m: then the candidates cannot tell, and the tie path runs)
    after = jnp.min(jnp.where(jnp.arange(m) < n + 1, cand, jnp.inf), axis=-1, keepdims=True)

    def with_ties():  # more than n logits reach the n-th value: keep the tied ones of lowest index
        greater = logits > nth
        tie = logits == nth
        need = n - jnp.sum(greater, axis=-1, keepdims=True)
        pos = jnp.arange(logits.shape[-1], dtype=_F32)
        lowest = jax.lax.top_k(jnp.where(tie, -pos, -jnp.inf), m)[0]
        limit = -jnp.min(jnp.where(jnp.arange(m) < need, lowest, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(greater | (tie & (pos <= limit)), logits, _NEG_INF)

    # the usual case, no tie at the boundary in any row: the (n+1)-th logit is below the n-th, so exactly n logits
    # reach the n-th value and they are the answer (a second top_k over the ties cost as much as the first, ~100 ms
    # for 256 rows of a 49k vocabulary; counting the logits >= nth, a pass over every row, ~5 ms for 64 rows)
    no_tie = jnp.all(after < nth)
    return jax.lax.cond(no_tie, lambda: jnp.where(logits >= nth, logits, _NEG_INF), with_ties)


def _top_p_sorted(logits: jax.Array, p: float) -> jax.Array:
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, ties by index; -inf entries last
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < jnp.float32(p)
    keep_sorted = keep_sorted.at[..., 0].set(True)
    inverse = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
    return jnp.where(keep, logits, _NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter on [..., V]: keep the smallest prefix of tokens, by descending probability, whose mass >= p.

    A token is kept iff the mass of the tokens strictly before it in the order is < p, so the top token always
    stays. The order is a stable sort: among equal logits the lower index comes first (deterministic ties).
    p = 1 is a no-op. When the 256 most likely tokens of every row hold mass >= p (the usual case) only those are
    looked at (a sort of a 49k vocabulary costs ~25 ms per row on CPU); otherwise the whole row is sorted.
    """
    validate_sampling_args(1.0, top_p=p)
    logits = jnp.asarray(logits, _F32)
    if float(p) >= 1.0:
        return logits
    m = _TOP_P_CANDIDATES
    if logits.shape[-1] <= 2 * m:
        return _top_p_sorted(logits, p)
    cand = jax.lax.top_k(logits, m)[0]  # descending
    probs = jnp.exp(cand - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < jnp.float32(p), axis=-1, keepdims=True), 1)
    # exact when some candidate's mass-before reaches p, i.e. the nucleus ends inside the candidates
    inside = jnp.all(jnp.sum(probs, axis=-1) - probs[..., -1] >= jnp.float32(p))
    return jax.lax.cond(inside, lambda: _keep_first_n(logits, cand, n_keep),
                        lambda: _top_p_sorted(logits, p))


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Keep tokens whose probability >= min_p * (max probability) on [..., V]; min_p = 0 is a no-op."""
    validate_sampling_args(1.0, min_p=min_p)
    logits = jnp.asarray(logits, _F32)
    if float(min_p) <= 0.0:
        return logits
    # p_v >= min_p * p_max  <=>  logit_v >= logit_max + log(min_p)  (the normaliser cancels)
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.float32(math.log(float(min_p)))
    return jnp.where(logits >= threshold, logits, _NEG_INF)


def process_logits(logits: jax.Array, temperature, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   min_p: Optional[float] = None) -> jax.Array:
    """Temperature, then top-k, then top-p, then min-p (each on the renormalised result of the previous step).

    logits [..., V] -> float32 [..., V] with removed entries at -inf. None switches a filter off. A static
    temperature of 0 returns ``greedy_logits`` (the filters are no-ops on a one-hot distribution).
    """
    validate_sampling_args(temperature, top_k, top_p, min_p)
    x = apply_temperature(logits, temperature)
    if _is_static_zero(temperature):
        return x
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    if min_p is not None:
        x = min_p_filter(x, min_p)
    return x


def probs_from_logits(logits: jax.Array, temperature, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      min_p: Optional[float] = None) -> jax.Array:
    """float32 softmax of ``process_logits``: [..., V] -> [..., V] (one-hot at a static temperature 0)."""
    return jax.nn.softmax(process_logits(logits, temperature, top_k, top_p, min_p), axis=-1)


_CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw in `categorical`


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Draw an index from softmax(logits) along the last axis: logits [..., V] (-inf = excluded) -> int32 [...],
    every leading position independent, one key for all of them (as ``jax.random.categorical(key, logits)``).

    The same law as ``jax.random.categorical``, with another draw: two uniforms per row instead of V Gumbel
    variates. The vocabulary is cut into blocks of 256; the first uniform picks a block by its share of the mass
    (inverse CDF over the block sums), the second a token inside it (inverse CDF over the block), so token i of
    block b comes out with probability (S_b / S) (p_i / S_b) = p_i / S, to the 2^-23 resolution of a float32
    uniform (the Gumbel draws have a like limit). On a CPU this costs ~0.1-0.2 ms per 49k-token row against
    ~2 ms for the Gumbel draws (the threefry bits dominate), and ~20 ms for 256 rows against ~220-330.
    A token with zero mass is never drawn, whatever the rounding of the cumulative sums. +inf logits share the
    draw among themselves, as with the Gumbel draws. A row with no finite logit returns an arbitrary index.
    """
    logits = jnp.asarray(logits, _F32)
    u = jax.random.uniform(key, logits.shape[:-1] + (2,), _F32)
    return _categorical_from_uniforms(logits, u)


def _inverse_cdf(mass: jax.Array, uniform: jax.Array) -> jax.Array:
    """The first index along the last axis whose cumulative mass exceeds uniform * total and whose own mass is
    positive; the last index with mass when rounding leaves none. The mass test matters: XLA may sum a long cumsum
    as a tree, so a zero-mass entry's cumulative value can differ from its predecessor's (on CPU from ~384 entries,
    i.e. vocabularies above 65,536 at the block level)."""
    cdf = jnp.cumsum(mass, axis=-1)
    positive = mass > 0
    ok = (cdf > (uniform * cdf[..., -1])[..., None]) & positive
    last = mass.shape[-1] - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.where(jnp.any(ok, axis=-1), jnp.argmax(ok, axis=-1), last).astype(jnp.int32)


def _categorical_from_uniforms(logits: jax.Array, u: jax.Array) -> jax.Array:
    """`categorical` given its two uniforms u [..., 2] (separate so that a test can place them at the edges)."""
    v = logits.shape[-1]
    lead = logits.shape[:-1]
    block = min(v, _CDF_BLOCK)
    nb = -(-v // block)
    x = logits
    if nb * block != v:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block - v)], constant_values=_NEG_INF)
    x = x.reshape(lead + (nb, block))
    top = jnp.max(logits, axis=-1)
    infinite = (top == jnp.inf)[..., None, None]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    # [..., nb, block]: the largest is 1 and excluded tokens 0; with +inf logits, mass 1 on each of them alone
    e = jnp.where(infinite, (x == jnp.inf).astype(_F32), jnp.exp(x - top[..., None, None]))
    b = _inverse_cdf(jnp.sum(e, axis=-1), u[..., 0])
    inner = jnp.take_along_axis(e, b[..., None, None], axis=-2)[..., 0, :]  # [..., block]
    i = _inverse_cdf(inner, u[..., 1])
    return jnp.minimum(b * block + i, v - 1).astype(jnp.int32)


def sample_token(key: jax.Array, logits: jax.Array, temperature, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, min_p: Optional[float] = None) -> jax.Array:
    """Draw one token per row: key a single PRNG key, logits [..., V] -> int32 [...].

    A static temperature of 0 is argmax (the key is unused); otherwise a categorical draw from the processed logits.
    """
    if _is_static_zero(temperature):
        validate_sampling_args(temperature, top_k, top_p, min_p)
        return jnp.argmax(jnp.asarray(logits, _F32), axis=-1).astype(jnp.int32)
    x = process_logits(logits, temperature, top_k, top_p, min_p)
    return categorical(key, x)


def sample_rows(keys: jax.Array, logits: jax.Array, temperature, top_k: Optional[int] = None,
                top_p: Optional[float] = None, min_p: Optional[float] = None) -> jax.Array:
    """`sample_token` row by row with one key per row: keys [B], logits [B, V] -> int32 [B], the same draws.

    The filters run once on the whole batch, outside the vmap, so that top_p's shortcut (a lax.cond on whether
    every row's nucleus lies in its 256 largest logits) stays a branch: under vmap a cond runs both sides.
    """
    if _is_static_zero(temperature):
        validate_sampling_args(temperature, top_k, top_p, min_p)
        return jnp.argmax(jnp.asarray(logits, _F32), axis=-1).astype(jnp.int32)
    x = process_logits(logits, temperature, top_k, top_p, min_p)
    return jax.vmap(categorical)(keys, x)


# ----------------------------------------------------------------------------------------------------------------
# Safe log-space arithmetic (no NaN when a probability is 0)
# ----------------------------------------------------------------------------------------------------------------


def _tempered_log_probs(logits: jax.Array, temperature) -> jax.Array:
    """log softmax(logits / T) in float32, [..., V]; one-hot log-probs (0 / -inf) for a static T = 0."""
    return jax.nn.log_softmax(apply_temperature(logits, temperature), axis=-1)


def _log_shifted(log_base: jax.Array, log_num: jax.Array, log_den: jax.Array, shift) -> jax.Array:
    """log(base * (num / den)^shift) from log values, elementwise, never NaN.

    Conventions: a zero factor stays exactly zero (base = 0, or num = 0 including 0/0, for shift > 0); num > 0 over
    den = 0 is a finite stand-in for +inf (capped at _BIG), so later differences and softmaxes stay finite;
    shift = 0 gives base whatever num and den are.
    """
    shift = jnp.asarray(shift, _F32)
    num_zero = log_num == _NEG_INF
    den_zero = log_den == _NEG_INF
    raw = log_num - jnp.where(den_zero, 0.0, log_den)  # never inf - inf
    diff = jnp.where(num_zero, _NEG_INF, jnp.where(den_zero, jnp.inf, raw))  # log(num/den), 0/0 read as 0
    scaled = jnp.where(shift == 0.0, 0.0, jnp.minimum(shift * jnp.where(shift == 0.0, 0.0, diff), _BIG))
    return jnp.where(log_base == _NEG_INF, _NEG_INF, jnp.minimum(log_base + scaled, _BIG))


def _accept_prob_from_logs(log_num: jax.Array, log_den: jax.Array) -> jax.Array:
    """min(1, num/den) from log values; den = 0 gives 1 if num > 0 else 0 (0/0 rejects)."""
    den_zero = log_den == _NEG_INF
    log_ratio = jnp.where(den_zero, jnp.where(log_num > _NEG_INF, 0.0, _NEG_INF),
                          log_num - jnp.where(den_zero, 0.0, log_den))
    return jnp.exp(jnp.minimum(log_ratio, 0.0))


def _accept_prob_from_probs(p_d: jax.Array, q_d: jax.Array) -> jax.Array:
    """min(1, p/q) elementwise; q = 0 gives 1 if p > 0 else 0 (such a draft cannot have come from q)."""
    q_pos = q_d > 0
    ratio = p_d / jnp.where(q_pos, q_d, 1.0)
    return jnp.where(q_pos, jnp.minimum(ratio, 1.0), (p_d > 0).astype(_F32))


def shifted_logits(logits_target: jax.Array, logits_draft: jax.Array, logits_sft: jax.Array,
                   shift=1.0) -> jax.Array:
    """l_target + shift * (l_draft - l_sft) in float32, [..., V] each; -inf entries handled without NaN."""
    return _log_shifted(jnp.asarray(logits_target, _F32), jnp.asarray(logits_draft, _F32),
                        jnp.asarray(logits_sft, _F32), shift)


def sss_target_probs(logits_target: jax.Array, logits_draft: jax.Array, logits_sft: jax.Array, temperature,
                     shift=1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                     min_p: Optional[float] = None) -> jax.Array:
    """The exact SSS / EFT target p~ = filter(softmax((l_ref + shift (l_r - l_sft)) / T)), [..., V] float32."""
    return probs_from_logits(shifted_logits(logits_target, logits_draft, logits_sft, shift), temperature,
                             top_k, top_p, min_p)


def mean_c(logits_target: jax.Array, logits_draft: jax.Array, logits_sft: jax.Array, temperature,
           shift=1.0) -> jax.Array:
    """C_t = sum_v pi_r(v) pi_ref(v) / pi_sft(v) per position: three [..., V] -> [...] float32.

    pi_X = softmax(l_X / T), tempered and unfiltered (docs/algorithms.md §1.3). With ``shift`` != 1 this is the mass
    sum_v pi_ref (pi_r / pi_sft)^shift of the paper rule's unnormalised target. C = 1 iff the paper rule is exact.
    Temperature 0 uses T = 1 (the one-hot limit makes C degenerate: 0, 1 or inf). A vocabulary entry with
    pi_sft = 0 < pi_r pi_ref gives C = inf (never NaN).
    """
    if _is_static_zero(temperature):
        temperature = 1.0
    log_ref = _tempered_log_probs(logits_target, temperature)
    log_r = _tempered_log_probs(logits_draft, temperature)
    log_sft = _tempered_log_probs(logits_sft, temperature)
    return jnp.exp(jax.nn.logsumexp(_log_shifted(log_ref, log_r, log_sft, shift), axis=-1))


# ----------------------------------------------------------------------------------------------------------------
# Speculative verification
# ----------------------------------------------------------------------------------------------------------------


def _row_keys(key):
    """(key for the K acceptance uniforms, key for the emitted token) of one row."""
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _count_accepted(key, accept_prob: jax.Array) -> jax.Array:
    """a = index of the first rejection (K if none) given [K] acceptance probabilities; int32 scalar."""
    u = jax.random.uniform(key, accept_prob.shape, _F32)  # in [0, 1): probability 1 always accepts, 0 never
    accepted = (u < accept_prob).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(accepted)).astype(jnp.int32)


def _verify_row(key, draft: jax.Array, q: jax.Array, p: jax.Array):
    """One row of ``verify_with_target``: draft [K], q [K, V], p [K+1, V]."""
    k_acc, k_out = _row_keys(key)
    n_draft = draft.shape[0]
    if n_draft == 0:  # no drafts: the block is one ordinary sample from p_0
        tok = categorical(k_out, jnp.log(p[0]))
        return jnp.int32(0), tok.astype(jnp.int32), jnp.bool_(False)
    pos = jnp.arange(n_draft)
    a = _count_accepted(k_acc, _accept_prob_from_probs(p[pos, draft], q[pos, draft]))
    p_a = p[a]
    q_a = q[jnp.minimum(a, n_draft - 1)]  # unused when a == K
    residual = jnp.maximum(p_a - q_a, 0.0)
    rejected = a < n_draft
    empty = rejected & ~(jnp.sum(residual) > 0.0)
    dist = jnp.where(rejected & ~empty, residual, p_a)  # residual, or p_a as fallback, or the bonus row p_K
    tok = categorical(k_out, jnp.log(dist))
    return a, tok.astype(jnp.int32), empty


def verify_with_target(keys: jax.Array, draft_tokens: jax.Array, q_probs: jax.Array,
                       p_probs: jax.Array) -> VerifyResult:
    """Exact speculative sampling (Leviathan et al.; Chen et al.) for a batch of blocks, with the empty-residual flag.

    keys [B] PRNG keys; draft_tokens [B, K] int; q_probs [B, K, V], the distributions the drafts were actually
    sampled from (after any proposal filter); p_probs [B, K+1, V], the target. Draft i+1 is accepted with
    probability min(1, p_i(d)/q_i(d)), sequentially; a = first rejection (K if none). On a < K the next token is
    drawn from norm((p_a - q_a)_+), or from p_a when that residual is all zero (flagged in ``empty_residual``);
    on a = K it is the bonus token from p_K. q(d) = 0 never yields NaN (accepted iff p(d) > 0).
    Returns ``VerifyResult(n_accepted [B] int32, next_token [B] int32, empty_residual [B] bool)``.
    """
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    q_probs = jnp.asarray(q_probs, _F32)
    p_probs = jnp.asarray(p_probs, _F32)
    a, tok, empty = jax.vmap(_verify_row)(keys, draft_tokens, q_probs, p_probs)
    return VerifyResult(a, tok, empty)


def speculative_verify(keys: jax.Array, draft_tokens: jax.Array, q_probs: jax.Array, p_probs: jax.Array):
    """Exact speculative sampling: returns (n_accepted [B] int32, next_token [B] int32).

    Shapes as in ``verify_with_target`` (keys [B], draft_tokens [B, K], q_probs [B, K, V], p_probs [B, K+1, V]).
    """
    res = verify_with_target(keys, draft_tokens, q_probs, p_probs)
    return res.n_accepted, res.next_token


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")


def _paper_row(key, draft, log_ref, log_r, log_sft, tilde, shift):
    """One row of the paper rule: draft [K]; the log-probs and the filtered exact-target logits `tilde` (the
    fallback and bonus distribution p~, processed on the whole batch outside the vmap) are [K+1, V]."""
    k_acc, k_out = _row_keys(key)
    n_draft = draft.shape[0]
    # log of the paper's unnormalised target pi_ref * (pi_r / pi_sft)^shift, [K+1, V]
    log_target = _log_shifted(log_ref, log_r, log_sft, shift)
    if n_draft > 0:
        pos = jnp.arange(n_draft)
        d_ref, d_r, d_sft = log_ref[pos, draft], log_r[pos, draft], log_sft[pos, draft]
        if _is_real_number(shift) and float(shift) == 1.0:
            accept_prob = _accept_prob_from_logs(d_ref, d_sft)  # min(1, pi_ref(d)/pi_sft(d)): docs/algorithms.md §2.3
        else:
            accept_prob = _accept_prob_from_logs(log_target[pos, draft], d_r)
        a = _count_accepted(k_acc, accept_prob)
    else:
        a = jnp.int32(0)
    # residual (pi_target - pi_r)_+ = (pi_r (pi_ref/pi_sft - 1))_+ at shift 1, in log space, on row a
    t_a, r_a = log_target[a], log_r[a]
    above = t_a > r_a
    log_res = jnp.where(above, t_a + jnp.log1p(-jnp.exp(jnp.where(above, r_a - t_a, 0.0))), _NEG_INF)
    rejected = a < n_draft
    empty = rejected & jnp.all(log_res == _NEG_INF)
    use_residual = rejected & ~empty
    # fallback after an empty residual and the bonus after a full accept are both row a of the exact target p~
    tilde_a = tilde[a]
    log_res = log_res - jnp.max(jnp.where(use_residual, log_res, 0.0))
    tok = categorical(k_out, jnp.where(use_residual, log_res, tilde_a))
    return a, tok.astype(jnp.int32), empty


def _authors_row(key, draft, log_ref, log_r, lt, ld, ls, shift):
    """One row of the released-code rule: draft [K]; log-probs and raw logits [K+1, V]."""
    k_acc, _ = _row_keys(key)
    n_draft = draft.shape[0]
    if n_draft > 0:
        pos = jnp.arange(n_draft)
        a = _count_accepted(k_acc, _accept_prob_from_logs(log_ref[pos, draft], log_r[pos, draft]))
    else:
        a = jnp.int32(0)
    greedy = jnp.argmax(shifted_logits(lt[a], ld[a], ls[a], shift)).astype(jnp.int32)
    tok = jnp.where(a < n_draft, greedy, jnp.int32(-1))
    return a, tok, jnp.bool_(False)


def sss_verify_with_flags(keys: jax.Array, draft_tokens: jax.Array, q_probs: jax.Array, logits_target: jax.Array,
                          logits_draft: jax.Array, logits_sft: jax.Array, mode: str, temperature, shift=1.0,
                          top_k: Optional[int] = None, top_p: Optional[float] = None,
                          min_p: Optional[float] = None) -> VerifyResult:
    """Reward-shifted speculative sampling verification (docs/algorithms.md §2.3), with the empty-residual flag.

    keys [B]; draft_tokens [B, K] int; q_probs [B, K, V] the proposal the drafts were sampled from;
    logits_target (pi_ref), logits_draft (pi_r, the aligned draft) and logits_sft (pi_sft): [B, K+1, V] each.
    ``mode``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` are static; ``shift`` (lambda) may be traced.

    * ``exact``: ``verify_with_target`` with q_probs and p~ = filter(softmax((l_ref + shift (l_r - l_sft)) / T)).
    * ``paper``: with tempered unfiltered pi_X = softmax(l_X / T): accept with min(1, pi_ref(d)/pi_sft(d)); on
      rejection draw from norm((pi_r (pi_ref/pi_sft - 1))_+), or from p~ when that is all zero (flagged); after a
      full accept draw the bonus from p~ row K. For shift != 1 the rule is speculative sampling from pi_r towards
      the unnormalised pi_ref (pi_r/pi_sft)^shift. q_probs is not used (the rule assumes drafts come from pi_r).
    * ``authors_code``: accept with min(1, pi_ref(d)/pi_r(d)); on rejection emit argmax(l_ref + shift (l_r - l_sft))
      of row a; after a full accept next_token = -1. q_probs is not used; empty_residual is always False.

    Filters (top_k / top_p / min_p) apply to p~ only. Returns ``VerifyResult`` ([B] int32, [B] int32, [B] bool).
    """
    _check_mode(mode)
    validate_sampling_args(temperature, top_k, top_p, min_p)
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    lt = jnp.asarray(logits_target, _F32)
    ld = jnp.asarray(logits_draft, _F32)
    ls = jnp.asarray(logits_sft, _F32)
    if mode == "exact":
        p_probs = sss_target_probs(lt, ld, ls, temperature, shift, top_k, top_p, min_p)
        return verify_with_target(keys, draft_tokens, q_probs, p_probs)
    log_ref = _tempered_log_probs(lt, temperature)
    log_r = _tempered_log_probs(ld, temperature)
    if mode == "paper":
        log_sft = _tempered_log_probs(ls, temperature)
        # p~ for every row and position, filtered on the whole batch (outside the vmap, where top_p's shortcut is a
        # branch rather than both sides of a select)
        tilde = process_logits(shifted_logits(lt, ld, ls, shift), temperature, top_k, top_p, min_p)

        def row(key, draft, l_ref, l_r, l_sft, t):
            return _paper_row(key, draft, l_ref, l_r, l_sft, t, shift)

        a, tok, empty = jax.vmap(row)(keys, draft_tokens, log_ref, log_r, log_sft, tilde)
    else:

        def row(key, draft, l_ref, l_r, t, d, s):
            return _authors_row(key, draft, l_ref, l_r, t, d, s, shift)

        a, tok, empty = jax.vmap(row)(keys, draft_tokens, log_ref, log_r, lt, ld, ls)
    return VerifyResult(a, tok, empty)


def sss_verify(keys: jax.Array, draft_tokens: jax.Array, q_probs: jax.Array, logits_target: jax.Array,
               logits_draft: jax.Array, logits_sft: jax.Array, mode: str, temperature, shift=1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None):
    """SSS verification (see ``sss_verify_with_flags``): returns (n_accepted [B] int32, next_token [B] int32)."""
    res = sss_verify_with_flags(keys, draft_tokens, q_probs, logits_target, logits_draft, logits_sft, mode,
                                temperature, shift, top_k, top_p, min_p)
    return res.n_accepted, res.next_token
