"""Tests for rss_jax.sampling (docs/algorithms.md §1 and §2).

Logit processors are checked against NumPy oracles; the verify rules by Monte Carlo against closed forms computed
here in NumPy (float64), on the worked examples of docs/algorithms.md and on random distributions.

Monte Carlo tolerance: a cell of true probability p estimated from n independent samples has standard error
sqrt(p (1 - p) / n). Every frequency (and rate) must lie within N_SE = 5 standard errors of its expected value,
plus 1e-6 for float32 rounding of the expected value (so a cell of probability 0 must never be hit). Seeds are
fixed, so the tests are deterministic; at 5 standard errors a correct sampler fails a cell with probability ~6e-7.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rss_jax import sampling

N = 200_000  # Monte Carlo samples (independent rows) per simulated law
N_SE = 5.0
MODES = ("exact", "paper", "authors_code")


# ----------------------------------------------------------------------------------------------------------------
# NumPy oracles (float64)
# ----------------------------------------------------------------------------------------------------------------


def np_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def np_top_k(logits, k):
    """Keep exactly k entries per row, the largest, lower index first among equal values."""
    logits = np.asarray(logits, np.float64)
    out = np.full_like(logits, -np.inf)
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        keep = np.argsort(-row, kind="stable")[:k]
        out[idx][keep] = row[keep]
    return out


def np_top_p(logits, p):
    """Keep the smallest prefix (stable descending order) whose mass reaches p: mass strictly before < p."""
    logits = np.asarray(logits, np.float64)
    out = np.full_like(logits, -np.inf)
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        order = np.argsort(-row, kind="stable")
        probs = np_softmax(row)[order]
        before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        keep = order[(before < p) | (np.arange(len(row)) == 0)]
        out[idx][keep] = row[keep]
    return out


def np_min_p(logits, min_p):
    logits = np.asarray(logits, np.float64)
    probs = np_softmax(logits)
    keep = probs >= min_p * probs.max(axis=-1, keepdims=True)
    return np.where(keep, logits, -np.inf)


def np_process(logits, temperature, top_k=None, top_p=None, min_p=None):
    x = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        x = np_top_k(x, top_k)
    if top_p is not None:
        x = np_top_p(x, top_p)
    if min_p is not None:
        x = np_min_p(x, min_p)
    return x


def _safe_div(a, b):
    """a / b with x/0 = inf for x > 0 and 0/0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.where(a > 0, np.inf, 0.0))


def _norm_or(x, fallback):
    s = x.sum()
    return x / s if s > 0 else fallback


def np_sd_law(q_sample, q_ratio, p):
    """One position of speculative sampling, draft ~ q_sample, ratio and residual with q_ratio.

    Returns (acceptance probability, law of the first emitted token).
    """
    acc_v = q_sample * np.minimum(1.0, _safe_div(p, q_ratio))
    acc = acc_v.sum()
    residual = _norm_or(np.maximum(p - q_ratio, 0.0), p)
    return acc, acc_v + (1.0 - acc) * residual


def np_paper_law(q, ref, r, sft, p_tilde):
    """The paper rule of docs/algorithms.md §2.3, draft ~ q.

    Accept min(1, ref/sft); residual norm((r (ref/sft - 1))_+), else p~."""
    w = _safe_div(ref, sft)
    acc_v = q * np.minimum(1.0, w)
    acc = acc_v.sum()
    with np.errstate(invalid="ignore"):
        residual = np.where(r > 0, np.maximum(r * (w - 1.0), 0.0), 0.0)
    residual = _norm_or(residual, p_tilde)
    return acc, acc_v + (1.0 - acc) * residual


def np_authors_law(q, ref, r, greedy_token):
    """Released-code rule, draft ~ q: accept min(1, ref/r); on rejection emit the greedy token."""
    acc_v = q * np.minimum(1.0, _safe_div(ref, r))
    acc = acc_v.sum()
    return acc, acc_v + (1.0 - acc) * np.eye(len(q))[greedy_token]


def np_mode_law(mode, q, lt, ld, ls, temperature, filters=(None, None, None)):
    """(acceptance, first-token law, p~) for K = 1 from raw logits [V], draft ~ q."""
    ref, r, sft = (np_softmax(np.asarray(x, np.float64) / temperature) for x in (lt, ld, ls))
    combined = np.asarray(lt, np.float64) + np.asarray(ld, np.float64) - np.asarray(ls, np.float64)
    p_tilde = np_softmax(np_process(combined, temperature, *filters))
    if mode == "exact":
        acc, law = np_sd_law(q, q, p_tilde)
    elif mode == "paper":
        acc, law = np_paper_law(q, ref, r, sft, p_tilde)
    elif mode == "authors_code":
        acc, law = np_authors_law(q, ref, r, int(np.argmax(combined)))
    else:  # plain speculative decoding towards pi_ref
        acc, law = np_sd_law(q, q, np_softmax(np_process(lt, temperature, *filters)))
    return acc, law, p_tilde


def assert_freq(freq, expected, n, what):
    """Each cell within N_SE standard errors sqrt(p (1 - p) / n) (+1e-6) of its expected probability."""
    freq = np.asarray(freq, np.float64)
    expected = np.asarray(expected, np.float64)
    tol = N_SE * np.sqrt(expected * (1.0 - expected) / n) + 1e-6
    bad = np.abs(freq - expected) > tol
    assert not bad.any(), f"{what}: observed {freq}, expected {expected}, tolerance {tol} (n={n})"


# ----------------------------------------------------------------------------------------------------------------
# Simulators (one compile per static configuration and shape)
# ----------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mode", "temperature", "shift", "filters"))
def simulate_one_position(key, q_sample, q_ratio, lt, ld, ls, mode, temperature, shift=1.0,
                          filters=(None, None, None)):
    """N independent K = 1 blocks at one position: the draft d ~ q_sample, verified with q_ratio as q_probs.

    q_sample, q_ratio, lt, ld, ls: [V] (the same for every row; row K = 1 of the logits repeats row 0).
    mode "sd" runs speculative_verify towards probs_from_logits(lt). Returns (frequencies [V] of the first emitted
    token, i.e. d if accepted else next_token; acceptance rate; empty-residual rate).
    """
    v = q_sample.shape[-1]
    k_draft, k_verify = jax.random.split(key)
    d = jax.random.categorical(k_draft, jnp.log(q_sample), shape=(N,))
    keys = jax.random.split(k_verify, N)
    q_rows = jnp.broadcast_to(q_ratio, (N, 1, v))
    lt_rows, ld_rows, ls_rows = (jnp.broadcast_to(x, (N, 2, v)) for x in (lt, ld, ls))
    if mode == "sd":
        p_rows = sampling.probs_from_logits(lt_rows, temperature, *filters)
        res = sampling.verify_with_target(keys, d[:, None], q_rows, p_rows)
    else:
        res = sampling.sss_verify_with_flags(keys, d[:, None], q_rows, lt_rows, ld_rows, ls_rows, mode, temperature,
                                             shift, *filters)
    first = jnp.where(res.n_accepted >= 1, d, res.next_token)
    freq = jnp.bincount(first, length=v) / N
    return freq, jnp.mean(res.n_accepted), jnp.mean(res.empty_residual)


def run_one_position(seed, q_sample, lt, ld, ls, mode, temperature, shift=1.0, filters=(None, None, None),
                     q_ratio=None):
    q_ratio = q_sample if q_ratio is None else q_ratio
    args = [jnp.asarray(x, jnp.float32) for x in (q_sample, q_ratio, lt, ld, ls)]
    freq, acc, empty = simulate_one_position(jax.random.key(seed), *args, mode=mode, temperature=temperature,
                                             shift=shift, filters=filters)
    return np.asarray(freq), float(acc), float(empty)


@jax.jit
def simulate_two_blocks(key, q, p):
    """Speculative decoding with context-free position-wise distributions q [K+1, V] and p [K+2, V].

    Block 1 drafts positions 0..K-1 from q[:K] and verifies with p[:K+1]; when it emits only one token (a = 0) the
    second token comes from block 2, which starts at position 1 (q[1:], p[1:]). Returns (joint frequencies [V*V]
    of the first two emitted tokens, histogram [K+1] of block 1's n_accepted, counts [V] of block 1's bonus token
    when a = K, any empty residual in block 1).
    """
    k = q.shape[0] - 1
    v = q.shape[1]
    k1, k2, kv1, kv2 = jax.random.split(key, 4)

    def block(k_draft, k_verify, q_block, p_block):
        d = jax.random.categorical(k_draft, jnp.log(q_block), shape=(N, k))
        q_rows = jnp.broadcast_to(q_block, (N,) + q_block.shape)
        p_rows = jnp.broadcast_to(p_block, (N,) + p_block.shape)
        res = sampling.verify_with_target(jax.random.split(k_verify, N), d, q_rows, p_rows)
        return d, res

    d1, r1 = block(k1, kv1, q[:k], p[:k + 1])
    d2, r2 = block(k2, kv2, q[1:], p[1:])
    a1 = r1.n_accepted
    first = jnp.where(a1 >= 1, d1[:, 0], r1.next_token)
    second_in_block1 = jnp.where(a1 >= 2, d1[:, 1], r1.next_token)
    second_in_block2 = jnp.where(r2.n_accepted >= 1, d2[:, 0], r2.next_token)
    second = jnp.where(a1 >= 1, second_in_block1, second_in_block2)
    joint = jnp.bincount(first * v + second, length=v * v) / N
    hist = jnp.bincount(a1, length=k + 1)
    bonus = jnp.bincount(jnp.where(a1 == k, r1.next_token, v), length=v + 1)[:v]
    return joint, hist, bonus, jnp.any(r1.empty_residual)


# ----------------------------------------------------------------------------------------------------------------
# Worked example, docs/algorithms.md §2.4
# ----------------------------------------------------------------------------------------------------------------

PI_REF = np.array([0.5, 0.3, 0.2])
PI_SFT = np.array([0.4, 0.4, 0.2])
PI_R = np.array([0.2, 0.5, 0.3])
WORKED_EXAMPLE = {  # mode -> (acceptance, output law), as printed in docs/algorithms.md §2.4 (4 decimals)
    "exact": (0.9054, [0.2703, 0.4054, 0.3243]),
    "paper": (0.875, [0.325, 0.375, 0.300]),
    "authors_code": (0.700, [0.200, 0.600, 0.200]),
    "sd": (0.700, [0.5, 0.3, 0.2]),
}


@pytest.mark.parametrize("mode", ["exact", "paper", "authors_code", "sd"])
def test_spec_22_worked_example(mode):
    lt, ld, ls = np.log(PI_REF), np.log(PI_R), np.log(PI_SFT)
    acc, law, p_tilde = np_mode_law(mode, PI_R, lt, ld, ls, 1.0)
    # the closed form reproduces the documented numbers ...
    spec_acc, spec_law = WORKED_EXAMPLE[mode]
    np.testing.assert_allclose(acc, spec_acc, atol=5e-5)
    np.testing.assert_allclose(law, spec_law, atol=5e-5)
    np.testing.assert_allclose(p_tilde, [0.2703, 0.4054, 0.3243], atol=5e-5)
    # ... and the sampler reproduces the closed form (draft d ~ q = pi_r)
    freq, acc_mc, empty = run_one_position(22, PI_R, lt, ld, ls, mode, 1.0)
    assert_freq(freq, law, N, f"{mode} output law")
    assert_freq(acc_mc, acc, N, f"{mode} acceptance")
    assert empty == 0.0


def test_spec_22_mean_c():
    lt, ld, ls = (jnp.log(jnp.asarray(x, jnp.float32)) for x in (PI_REF, PI_R, PI_SFT))
    np.testing.assert_allclose(float(sampling.mean_c(lt, ld, ls, 1.0)), 0.925, atol=1e-6)
    np.testing.assert_allclose(np.sum(PI_R * PI_REF / PI_SFT), 0.925, atol=1e-12)
    # batched [..., V] -> [...], logit offsets do not matter, temperature tempers all three distributions
    offsets = jnp.asarray([[0.0], [3.0]], jnp.float32)
    c = sampling.mean_c(lt + offsets, ld - offsets, ls + 2 * offsets, 0.5)
    ref, r, sft = (np_softmax(np.log(x) / 0.5) for x in (PI_REF, PI_R, PI_SFT))
    np.testing.assert_allclose(np.asarray(c), [np.sum(r * ref / sft)] * 2, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Random distributions: every mode against its closed form
# ----------------------------------------------------------------------------------------------------------------

T_RANDOM = 0.7
V_RANDOM = 7


def random_logits(rng, v=V_RANDOM, n=3):
    """n logit vectors [v] of Dirichlet(1) distributions, each shifted by a random constant."""
    return [np.log(rng.dirichlet(np.ones(v))) + rng.normal() for _ in range(n)]


@pytest.mark.parametrize("mode", ["exact", "paper", "authors_code", "sd"])
def test_random_distributions_match_closed_form(mode):
    rng = np.random.default_rng(7)
    for trial in range(2):
        lt, ld, ls = random_logits(rng)
        # the proposal is the filtered, tempered aligned draft (what the drafter actually samples from)
        q = np_softmax(np_process(ld, T_RANDOM, top_k=5))
        acc, law, p_tilde = np_mode_law(mode, q, lt, ld, ls, T_RANDOM)
        if mode == "exact":
            np.testing.assert_allclose(law, p_tilde, atol=1e-12)  # theory: exact sampling of p~
        freq, acc_mc, _ = run_one_position(100 + trial, q, lt, ld, ls, mode, T_RANDOM)
        assert_freq(freq, law, N, f"{mode} trial {trial} output law")
        assert_freq(acc_mc, acc, N, f"{mode} trial {trial} acceptance")


def test_exact_mode_with_target_filters_and_shift():
    """Target filters act on p~ only; shift scales the reward term. Law = filtered p~ whatever the proposal."""
    rng = np.random.default_rng(11)
    lt, ld, ls = random_logits(rng)
    filters = (5, 0.9, 0.05)
    for shift in (1.0, 0.5):
        combined = lt + shift * (ld - ls)
        p_tilde = np_softmax(np_process(combined, T_RANDOM, *filters))
        q = np_softmax(np.asarray(ld) / T_RANDOM)  # unfiltered proposal
        acc, law = np_sd_law(q, q, p_tilde)
        freq, acc_mc, _ = run_one_position(31, q, lt, ld, ls, "exact", T_RANDOM, shift=shift, filters=filters)
        assert_freq(freq, p_tilde, N, f"exact filtered shift={shift} law")
        assert_freq(acc_mc, acc, N, f"exact filtered shift={shift} acceptance")


def test_paper_mode_shift_generalisation():
    """shift != 1: speculative sampling from pi_r towards the unnormalised pi_ref (pi_r / pi_sft)^shift."""
    rng = np.random.default_rng(12)
    lt, ld, ls = random_logits(rng)
    shift = 0.5
    ref, r, sft = (np_softmax(np.asarray(x) / T_RANDOM) for x in (lt, ld, ls))
    target = ref * (r / sft) ** shift
    acc_v = r * np.minimum(1.0, target / r)
    acc = acc_v.sum()
    p_tilde = np_softmax((lt + shift * (ld - ls)) / T_RANDOM)
    law = acc_v + (1 - acc) * _norm_or(np.maximum(target - r, 0.0), p_tilde)
    freq, acc_mc, _ = run_one_position(32, r, lt, ld, ls, "paper", T_RANDOM, shift=shift)
    assert_freq(freq, law, N, "paper shift=0.5 law")
    assert_freq(acc_mc, acc, N, "paper shift=0.5 acceptance")
    c = float(sampling.mean_c(jnp.asarray(lt), jnp.asarray(ld), jnp.asarray(ls), T_RANDOM, shift))
    np.testing.assert_allclose(c, target.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Invariants, docs/algorithms.md §2.5
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_invariant_no_reward_gives_reference(mode):
    """pi_r = pi_sft (logits equal up to a constant) => exact and paper sample pi_ref."""
    rng = np.random.default_rng(23)
    lt, ld, _ = random_logits(rng)
    ls = ld + 1.5
    pi_ref = np_softmax(lt / T_RANDOM)
    q = np_softmax(ld / T_RANDOM)
    acc, law, _ = np_mode_law(mode, q, lt, ld, ls, T_RANDOM)
    np.testing.assert_allclose(law, pi_ref, atol=1e-12)
    np.testing.assert_allclose(acc, np.minimum(q, pi_ref).sum(), atol=1e-12)
    freq, acc_mc, _ = run_one_position(41, q, lt, ld, ls, mode, T_RANDOM)
    assert_freq(freq, pi_ref, N, f"{mode}: pi_r = pi_sft law")
    assert_freq(acc_mc, acc, N, f"{mode}: pi_r = pi_sft acceptance")
    c = sampling.mean_c(jnp.asarray(lt), jnp.asarray(ld), jnp.asarray(ls), T_RANDOM)
    np.testing.assert_allclose(float(c), 1.0, rtol=1e-5)


def test_invariant_reference_equals_sft_gives_draft():
    """pi_ref = pi_sft => exact samples pi_r with acceptance 1."""
    rng = np.random.default_rng(24)
    lt, ld, _ = random_logits(rng)
    ls = lt - 0.5
    pi_r = np_softmax(ld / T_RANDOM)
    freq, acc_mc, _ = run_one_position(42, pi_r, lt, ld, ls, "exact", T_RANDOM)
    assert_freq(freq, pi_r, N, "exact: pi_ref = pi_sft law")
    assert acc_mc >= 1.0 - 1e-4  # p~ and q agree up to float32 rounding


# ----------------------------------------------------------------------------------------------------------------
# Proposal filtering pitfall, docs/algorithms.md §2.6
# ----------------------------------------------------------------------------------------------------------------


def test_spec_24_filtering_pitfall():
    pi_ref = np.array([0.40, 0.30, 0.20, 0.10])
    pi_sft = np.array([0.35, 0.25, 0.25, 0.15])
    pi_r = pi_sft * np.array([1.0, 1.0, 1.0, 3.0])
    pi_r = pi_r / pi_r.sum()
    lt, ld, ls = np.log(pi_ref), np.log(pi_r), np.log(pi_sft)
    q = np.asarray(sampling.probs_from_logits(jnp.asarray(ld, jnp.float32), 1.0, top_k=2), np.float64)
    np.testing.assert_allclose(q, [0.4375, 0.0, 0.0, 0.5625], atol=1e-6)
    q = np.array([0.4375, 0.0, 0.0, 0.5625])
    acc, law, p_tilde = np_mode_law("exact", q, lt, ld, ls, 1.0)
    np.testing.assert_allclose(p_tilde, [1 / 3, 0.25, 1 / 6, 0.25], atol=1e-12)
    np.testing.assert_allclose(law, p_tilde, atol=1e-12)
    np.testing.assert_allclose(acc, 0.5833, atol=5e-5)
    freq, acc_mc, _ = run_one_position(24, q, lt, ld, ls, "exact", 1.0)
    assert_freq(freq, p_tilde, N, "2.4 with the actual q")
    assert_freq(acc_mc, acc, N, "2.4 acceptance with the actual q")
    # the pitfall: drafts from the filtered q, but the unfiltered pi_r in ratio and residual
    acc_b, law_b = np_sd_law(q, pi_r, p_tilde)
    np.testing.assert_allclose(law_b, [0.5197, 0.0740, 0.0, 0.4062], atol=5e-5)
    freq_b, acc_b_mc, _ = run_one_position(25, q, lt, ld, ls, "exact", 1.0, q_ratio=pi_r)
    assert_freq(freq_b, law_b, N, "2.4 biased law")
    assert_freq(acc_b_mc, acc_b, N, "2.4 biased acceptance")


# ----------------------------------------------------------------------------------------------------------------
# Speculative decoding over several positions (K = 3)
# ----------------------------------------------------------------------------------------------------------------

K_SEQ = 3
V_SEQ = 5


def _seq_distributions(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V_SEQ), size=K_SEQ + 2)
    q = rng.dirichlet(np.ones(V_SEQ), size=K_SEQ + 1)
    return q, p


def test_sd_two_token_law_and_acceptance_histogram():
    q, p = _seq_distributions(5)
    joint, hist, bonus, _ = simulate_two_blocks(jax.random.key(5), jnp.asarray(q, jnp.float32),
                                                jnp.asarray(p, jnp.float32))
    # the first two emitted tokens follow the autoregressive (here product) law of p
    assert_freq(np.asarray(joint), np.outer(p[0], p[1]).ravel(), N, "joint law of the first two tokens")
    # P(a >= i) = prod_{j < i} beta_j with beta_j = sum_v min(p_j, q_j) (context-free rows)
    beta = np.minimum(p[:K_SEQ], q[:K_SEQ]).sum(axis=1)
    at_least = np.concatenate([[1.0], np.cumprod(beta)])
    expected_hist = at_least - np.concatenate([at_least[1:], [0.0]])
    assert_freq(np.asarray(hist) / N, expected_hist, N, "histogram of n_accepted")
    # after a full accept the next token is the bonus, drawn from p_K
    n_full = int(np.asarray(hist)[K_SEQ])
    assert n_full > 10_000
    assert_freq(np.asarray(bonus) / n_full, p[K_SEQ], n_full, "bonus token law")


def test_sd_full_accept_when_q_equals_p():
    _, p = _seq_distributions(6)
    q = p[:K_SEQ + 1]
    joint, hist, bonus, any_empty = simulate_two_blocks(jax.random.key(6), jnp.asarray(q, jnp.float32),
                                                        jnp.asarray(p, jnp.float32))
    assert int(np.asarray(hist)[K_SEQ]) == N  # every draft accepted
    assert not bool(any_empty)
    assert_freq(np.asarray(bonus) / N, p[K_SEQ], N, "bonus law with q == p")
    assert_freq(np.asarray(joint), np.outer(p[0], p[1]).ravel(), N, "joint law with q == p")


# ----------------------------------------------------------------------------------------------------------------
# Empty residuals, zero probabilities, temperature 0
# ----------------------------------------------------------------------------------------------------------------


def test_paper_empty_residual_falls_back_to_p_tilde():
    """pi_r puts all mass where pi_ref/pi_sft < 1, so every rejection has an empty residual and uses p~."""
    pi_ref = np.array([0.5, 0.4, 0.1])
    pi_sft = np.array([0.4, 0.3, 0.3])
    lt, ls = np.log(pi_ref), np.log(pi_sft)
    ld = np.array([-np.inf, -np.inf, 0.0])  # pi_r = (0, 0, 1); p~ = norm(pi_ref pi_r / pi_sft) = (0, 0, 1)
    q = np.array([0.0, 0.0, 1.0])
    freq, acc_mc, empty = run_one_position(3, q, lt, ld, ls, "paper", 1.0)
    assert_freq(acc_mc, 1 / 3, N, "acceptance min(1, 0.1 / 0.3)")
    assert_freq(empty, 2 / 3, N, "empty residual rate")
    np.testing.assert_array_equal(freq, [0.0, 0.0, 1.0])


def test_verify_with_target_empty_residual_and_zero_q():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jnp.asarray([[[0.5, 0.5, 0.0]]] * 4, jnp.float32)
    p = jnp.asarray([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],  # p_0 == q_0, draft 2: rejected, residual empty
                     [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]],  # q(2) = 0 < p(2): accepted, bonus token 2
                     [[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]],  # draft 0 ratio 0.5
                     [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], jnp.float32)  # p(0) = 0: rejected, residual = p
    draft = jnp.asarray([[2], [2], [0], [0]], jnp.int32)
    res = jax.jit(sampling.verify_with_target)(keys, draft, q, p)
    a, tok, empty = (np.asarray(x) for x in res)
    assert a.dtype == np.int32 and tok.dtype == np.int32 and empty.dtype == np.bool_
    assert a[0] == 0 and empty[0] and tok[0] in (0, 1)
    assert a[1] == 1 and not empty[1] and tok[1] == 2
    assert (a[2] == 1 and tok[2] == 2) or (a[2] == 0 and tok[2] == 1)
    assert a[3] == 0 and not empty[3] and tok[3] == 1
    a2, tok2 = sampling.speculative_verify(keys, draft, q, p)
    np.testing.assert_array_equal(np.asarray(a2), a)
    np.testing.assert_array_equal(np.asarray(tok2), tok)


@pytest.mark.parametrize("mode", MODES)
def test_zero_probabilities_never_give_nan(mode):
    """pi_sft = 0, pi_r = 0 and pi_ref = 0 entries (logits -inf) in every position; outputs stay valid."""
    b, k, v = 64, 2, 4
    rng = np.random.default_rng(1)
    lt = rng.normal(size=(b, k + 1, v)).astype(np.float32)
    ld = rng.normal(size=(b, k + 1, v)).astype(np.float32)
    ls = rng.normal(size=(b, k + 1, v)).astype(np.float32)
    ls[..., 0] = -np.inf  # pi_sft(0) = 0
    ld[..., 1] = -np.inf  # pi_r(1) = 0
    lt[..., 2] = -np.inf  # pi_ref(2) = 0
    ls[..., 1] = -np.inf  # 0/0 at token 1
    q = np.asarray(sampling.probs_from_logits(jnp.asarray(ld[:, :k]), 1.0))
    draft = rng.integers(0, v, size=(b, k)).astype(np.int32)  # includes drafts with q(d) = 0
    keys = jax.random.split(jax.random.key(1), b)
    res = sampling.sss_verify_with_flags(keys, draft, q, lt, ld, ls, mode, 1.0)
    a, tok = np.asarray(res.n_accepted), np.asarray(res.next_token)
    assert ((a >= 0) & (a <= k)).all()
    if mode == "authors_code":
        assert ((tok >= -1) & (tok < v)).all() and ((tok == -1) == (a == k)).all()
    else:
        assert ((tok >= 0) & (tok < v)).all()
        assert not (tok == 2).any()  # pi_ref(2) = 0 => p~(2) = 0, and the paper residual is 0 there too
    c = np.asarray(sampling.mean_c(lt, ld, ls, 1.0))
    assert not np.isnan(c).any() and np.isinf(c).all()  # pi_sft(0) = 0 < pi_r pi_ref at token 0
    p_tilde = np.asarray(sampling.sss_target_probs(lt, ld, ls, 1.0))
    assert not np.isnan(p_tilde).any()


def _leading_matches(match):
    """[B, K] bool -> [B] count of leading True."""
    return np.cumprod(match, axis=1).sum(axis=1)


@pytest.mark.parametrize("mode", ["sd", "exact", "paper", "authors_code"])
def test_temperature_zero_is_greedy_speculation(mode):
    b, k, v = 512, 3, 3
    rng = np.random.default_rng(2)
    lt, ld, ls = (rng.normal(size=(b, k + 1, v)).astype(np.float32) for _ in range(3))
    draft = np.argmax(ld[:, :k], axis=-1).astype(np.int32)  # greedy drafts
    q = sampling.probs_from_logits(jnp.asarray(ld[:, :k]), 0.0)
    np.testing.assert_array_equal(np.asarray(q), np.eye(v)[draft])  # one-hot proposal
    keys = jax.random.split(jax.random.key(3), b)
    combined_greedy = np.argmax(lt + (ld - ls), axis=-1)  # float32, as computed in the library
    ref_greedy = np.argmax(lt, axis=-1)
    rows = np.arange(b)
    if mode == "sd":
        res = sampling.verify_with_target(keys, draft, q, sampling.probs_from_logits(jnp.asarray(lt), 0.0))
        expected_a = _leading_matches(draft == ref_greedy[:, :k])
        expected_tok = ref_greedy[rows, expected_a]
    else:
        res = sampling.sss_verify_with_flags(keys, draft, q, lt, ld, ls, mode, 0.0)
        target = combined_greedy if mode == "exact" else ref_greedy
        expected_a = _leading_matches(draft == target[:, :k])
        expected_tok = combined_greedy[rows, expected_a]
        if mode == "authors_code":
            expected_tok = np.where(expected_a == k, -1, expected_tok)
    a, tok, empty = (np.asarray(x) for x in res)
    assert 0 < (a == k).sum() < b and (a == 0).sum() > 0  # the test covers partial and full accepts
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(tok, expected_tok)
    # one-hot p minus one-hot q is one-hot p: never empty; the paper residual is always empty at T = 0
    np.testing.assert_array_equal(empty, (a < k) if mode == "paper" else np.zeros(b, bool))


def test_invalid_mode_names_the_valid_modes():
    keys = jax.random.split(jax.random.key(0), 1)
    z = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="exact.*paper.*authors_code"):
        sampling.sss_verify(keys, jnp.zeros((1, 1), jnp.int32), z[:, :1], z, z, z, "fast", 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Logit processors
# ----------------------------------------------------------------------------------------------------------------


def _processor_logits(seed, shape=(32, 10)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2.0
    x[::2] = np.round(x[::2])  # half the rows have many ties
    return x.astype(np.float32)


def _assert_same_filter(got, expected):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = ~np.isneginf(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7, 10, 20])
def test_top_k_matches_oracle(k):
    x = _processor_logits(0)
    got = sampling.top_k_filter(jnp.asarray(x), k)
    _assert_same_filter(got, np_top_k(x, k))
    assert (np.isfinite(np.asarray(got)).sum(axis=-1) == min(k, x.shape[-1])).all()


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_oracle(p):
    x = _processor_logits(1)
    _assert_same_filter(sampling.top_p_filter(jnp.asarray(x), p), np_top_p(x, p))


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_and_top_k_on_a_large_vocabulary(p):
    """V = 1200 > 2 x 256 candidates: peaked rows (the nucleus lies inside the 256 largest: the fast path), flat rows
    (it does not: the whole row is sorted) and rows with ties at the boundary all equal the NumPy oracle."""
    rng = np.random.default_rng(3)
    peaked = rng.normal(size=(6, 1200)) * 4.0
    flat = rng.normal(size=(6, 1200)) * 0.3
    ties = np.round(rng.normal(size=(6, 1200)) * 2.0)  # many equal logits
    for x in (peaked, flat, ties, np.concatenate([peaked, flat])):
        x = x.astype(np.float32)
        _assert_same_filter(sampling.top_p_filter(jnp.asarray(x), p), np_top_p(x, p))
    x = ties.astype(np.float32)
    for k in (1, 40, 300):
        _assert_same_filter(sampling.top_k_filter(jnp.asarray(x), k), np_top_k(x, k))


def test_top_p_ties_are_deterministic():
    x = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 0.0]])  # three tied top tokens, each ~0.3 of the mass
    got = np.asarray(sampling.top_p_filter(x, 0.5))
    np.testing.assert_array_equal(np.isfinite(got[0]), [False, True, True, False, False])
    got = np.asarray(sampling.top_k_filter(x, 2))
    np.testing.assert_array_equal(np.isfinite(got[0]), [False, True, True, False, False])


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9])
def test_min_p_matches_oracle(min_p):
    x = _processor_logits(2)
    _assert_same_filter(sampling.min_p_filter(jnp.asarray(x), min_p), np_min_p(x, min_p))


@pytest.mark.parametrize("config", [(1.0, None, None, None), (0.5, 4, None, None), (2.0, None, 0.8, None),
                                    (0.7, None, None, 0.1), (0.8, 6, 0.9, 0.05)])
def test_process_logits_matches_oracle(config):
    temperature, top_k, top_p, min_p = config
    x = _processor_logits(3)
    got = sampling.process_logits(jnp.asarray(x), temperature, top_k, top_p, min_p)
    assert got.dtype == jnp.float32
    expected = np_process(x, temperature, top_k, top_p, min_p)
    _assert_same_filter(got, expected)
    probs = sampling.probs_from_logits(jnp.asarray(x), temperature, top_k, top_p, min_p)
    np.testing.assert_allclose(np.asarray(probs), np_softmax(expected), atol=1e-6)


def test_temperature_and_greedy():
    x = _processor_logits(4)
    np.testing.assert_allclose(np.asarray(sampling.apply_temperature(jnp.asarray(x), 0.25)), x / 0.25, rtol=1e-6)
    # bf16 logits come out float32
    assert sampling.apply_temperature(jnp.asarray(x, jnp.bfloat16), 2.0).dtype == jnp.float32
    greedy = np.asarray(sampling.probs_from_logits(jnp.asarray(x), 0.0, top_k=3, top_p=0.5))
    np.testing.assert_array_equal(greedy, np.eye(x.shape[-1])[np.argmax(x, axis=-1)])  # first index on ties
    tok = sampling.sample_token(jax.random.key(0), jnp.asarray(x), 0.0)
    assert tok.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(x, axis=-1))


@pytest.mark.parametrize("args, message", [
    ((-1.0, None, None, None), "temperature must be >= 0, got -1.0"),
    ((float("nan"), None, None, None), "temperature must be >= 0"),
    ((1.0, 0, None, None), "top_k must be an integer >= 1, got 0"),
    ((1.0, 2.5, None, None), "top_k must be an integer >= 1, got 2.5"),
    ((1.0, True, None, None), "top_k must be an integer >= 1"),
    ((1.0, None, 1.5, None), r"top_p must be in \(0, 1\], got 1.5"),
    ((1.0, None, 0.0, None), r"top_p must be in \(0, 1\], got 0.0"),
    ((1.0, None, None, 1.0), r"min_p must be in \[0, 1\), got 1.0"),
    ((1.0, None, None, -0.1), r"min_p must be in \[0, 1\), got -0.1"),
])
def test_validation_errors(args, message):
    with pytest.raises(ValueError, match=message):
        sampling.validate_sampling_args(*args)
    with pytest.raises(ValueError, match=message):
        sampling.process_logits(jnp.zeros((2, 5)), *args)


def test_validation_accepts_valid_args():
    sampling.validate_sampling_args(0.0, 1, 1.0, 0.0)
    sampling.validate_sampling_args(0.7, np.int64(40), 0.95, 0.05)
    sampling.validate_sampling_args(1.0)


SAMPLE_LOGITS = np.array([1.2, 0.3, -0.5, 2.0, 0.0, -1.3, 0.9, 1.9], np.float32)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "min_p"))
def _sample_frequencies(key, logits, temperature, top_k, top_p, min_p):
    keys = jax.random.split(key, N)
    tokens = jax.vmap(lambda k: sampling.sample_token(k, logits, temperature, top_k, top_p, min_p))(keys)
    return jnp.bincount(tokens, length=logits.shape[-1]) / N


@pytest.mark.parametrize("config", [(0.8, None, None, None), (1.0, 3, None, None), (1.0, None, 0.7, None),
                                    (1.0, None, None, 0.3), (0.7, 5, 0.8, 0.05)])
def test_sample_token_frequencies(config):
    temperature, top_k, top_p, min_p = config
    expected = np_softmax(np_process(SAMPLE_LOGITS, temperature, top_k, top_p, min_p))
    freq = _sample_frequencies(jax.random.key(9), jnp.asarray(SAMPLE_LOGITS), temperature, top_k, top_p, min_p)
    assert_freq(np.asarray(freq), expected, N, f"sample_token {config}")


def test_sample_rows_equals_per_row_sample_token():
    """The batched filter path (what the decoders use, so top_p's shortcut stays a real branch) draws exactly what
    sample_token draws row by row with the same keys."""
    rng = np.random.default_rng(9)
    logits = jnp.asarray((rng.normal(size=(16, 1200)) * np.array([4.0, 0.3] * 8)[:, None]).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 16)
    for kw in ({"top_p": 0.9}, {"top_k": 40}, {"min_p": 0.05}, {}):
        want = jax.vmap(lambda k, l: sampling.sample_token(k, l, 0.8, **kw))(keys, logits)
        np.testing.assert_array_equal(np.asarray(sampling.sample_rows(keys, logits, 0.8, **kw)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(sampling.sample_rows(keys, logits, 0.0)),
                                  np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("filt", [{"top_k": 1}, {"top_p": 1e-6}])
def test_paper_bonus_uses_the_filtered_exact_target(filt):
    """paper mode: drafts with pi_ref > pi_sft are always accepted, so the bonus is drawn from row K of the
    filtered p~; a filter that keeps one token makes it the argmax of l_ref + l_r - l_sft, whatever the key."""
    rng = np.random.default_rng(11)
    b, k, v = 64, 2, 1200
    lt, ld, ls = (rng.normal(size=(b, k + 1, v)).astype(np.float32) for _ in range(3))
    draft = rng.integers(0, v, size=(b, k))
    rows, pos = np.arange(b)[:, None], np.arange(k)[None, :]
    lt[rows, pos, draft] += 8.0  # pi_ref(d) >> pi_sft(d): min(1, pi_ref / pi_sft) = 1
    keys = jax.random.split(jax.random.key(0), b)
    q = jnp.zeros((b, k, v), jnp.float32)  # unused by the paper rule
    a, tok = sampling.sss_verify(keys, jnp.asarray(draft), q, lt, ld, ls, "paper", 1.0, **filt)
    assert (np.asarray(a) == k).all()
    np.testing.assert_array_equal(np.asarray(tok), np.argmax((lt + ld - ls)[:, k], axis=-1))


@pytest.mark.parametrize("case", ["one_block", "ragged_blocks", "empty_blocks", "peaked"])
def test_categorical_two_level_draw_has_the_softmax_law(case):
    """`categorical` (block by mass, then token in block by inverse CDF) against the NumPy softmax: every token's
    frequency within N_SE standard errors, excluded (-inf) tokens never drawn, and the leading axes independent
    (a [2, 3] batch of different rows under one key). The vocabularies cross block boundaries unevenly (1000 =
    3 x 256 + 232), hold whole blocks of -inf, and put most mass on one token with tails of ~1e-5."""
    rng = np.random.default_rng({"one_block": 1, "ragged_blocks": 2, "empty_blocks": 3, "peaked": 4}[case])
    v = 7 if case == "one_block" else 1000
    logits = rng.normal(size=(2, 3, v)).astype(np.float32)
    if case == "one_block":
        logits[..., 2] = -np.inf
    if case == "empty_blocks":
        logits[..., 256:768] = -np.inf  # blocks 1 and 2 hold no mass
        logits[0, 1, 768:] = -np.inf  # and this row only has block 0
    if case == "peaked":
        logits[..., :] -= 9.0
        logits[..., 517] = 3.0
    expected = np_softmax(logits)
    n = N // 4
    keys = jax.random.split(jax.random.key(17), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling.categorical(k, jnp.asarray(logits))))(keys))  # [n, 2, 3]
    assert draws.dtype == np.int32 and draws.shape == (n, 2, 3)
    for i in range(2):
        for j in range(3):
            freq = np.bincount(draws[:, i, j], minlength=v) / n
            want = expected[i, j]
            assert freq[want == 0].sum() == 0, f"{case}: a token of zero mass was drawn"
            # tokens expected 25+ times are checked alone; the rarer ones pooled per 64 consecutive ids (a normal
            # tolerance does not hold for a cell expected 0.2 times, whatever the sampler)
            alone = want * n >= 25
            pool = np.where(alone, -1, np.arange(v) // 64)
            f_bins = [freq[alone]] + [freq[pool == g].sum(keepdims=True) for g in np.unique(pool[pool >= 0])]
            w_bins = [want[alone]] + [want[pool == g].sum(keepdims=True) for g in np.unique(pool[pool >= 0])]
            assert_freq(np.concatenate(f_bins), np.concatenate(w_bins), n, f"categorical {case} row {i},{j}")


def test_categorical_with_one_finite_logit_always_draws_it():
    """One finite logit is always drawn, wherever it sits: first, at a block's end or start, last of a ragged last
    block (the uniforms at the very top of [0, 1) are placed by the test below)."""
    v = 700
    for pos in (0, 255, 256, 699):
        x = np.full(v, -np.inf, np.float32)
        x[pos] = -3.0
        keys = jax.random.split(jax.random.key(pos), 512)
        got = np.asarray(jax.vmap(lambda k: sampling.categorical(k, jnp.asarray(x)))(keys))
        assert (got == pos).all(), pos


def test_categorical_never_draws_zero_mass_at_the_edges_of_a_long_cumsum():
    """A vocabulary of 128,256 (Llama-3's; 501 blocks, past where XLA sums a cumsum as a tree and a zero-mass
    block's cumulative value can differ from the one before it) with a top-k-like row: 50 finite logits scattered
    over mostly empty blocks. The uniforms are placed exactly at every block's cumulative share and one float32
    step either side, where a rounding slip would pick an empty block: every draw must be a finite logit. And
    +inf logits share the draw, as with jax.random.categorical."""
    rng = np.random.default_rng(21)
    v = 128_256
    x = np.full(v, -np.inf, np.float32)
    live = rng.choice(v, 50, replace=False)
    x[live] = rng.normal(size=50).astype(np.float32) * 2
    block = sampling._CDF_BLOCK
    nb = -(-v // block)
    xp = np.pad(x, (0, nb * block - v), constant_values=-np.inf).reshape(nb, block)
    sums = np.exp(xp - x.max()).sum(-1).astype(np.float32)
    cdf = np.asarray(jnp.cumsum(jnp.asarray(sums)))
    edges = (cdf / cdf[-1]).astype(np.float32)
    us = np.concatenate([edges, np.nextafter(edges, 0, dtype=np.float32), np.nextafter(edges, 1, dtype=np.float32),
                         np.float32([0.0, 1 - 2 ** -24])])
    us = np.clip(us, 0, 1 - 2 ** -24).astype(np.float32)
    grid = np.stack(np.meshgrid(us, np.float32([0.0, 0.5, 1 - 2 ** -24]), indexing="ij"), -1).reshape(-1, 2)
    got = np.asarray(jax.jit(jax.vmap(lambda u: sampling._categorical_from_uniforms(jnp.asarray(x), u)))(
        jnp.asarray(grid)))
    assert np.isfinite(x[got]).all(), np.unique(got[~np.isfinite(x[got])])
    y = np.float32([0.0, np.inf, -np.inf, np.inf])
    keys = jax.random.split(jax.random.key(4), 2000)
    draws = np.asarray(jax.vmap(lambda k: sampling.categorical(k, jnp.asarray(y)))(keys))
    assert set(np.unique(draws)) == {1, 3}
