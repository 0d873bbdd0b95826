"""The SSS paper's other baselines: ARGS, CARDS, item-level rejection sampling and TreeBoN.

Tiny random models; oracles are transformers' logits, NumPy recomputations and plain sequential reference loops."""
from __future__ import annotations

import numpy as np
import pytest

import rss_jax as rj
from tests.conftest import VOCAB, randomise

PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
EOS = [5, 11]
N_NEW = 10


def last_token_reward(prompt_ids, response_ids):
    """A reward of the response's last token, so that ARGS's candidates differ."""
    return [((r[-1] * 7) % 13) / 13.0 if len(r) else 0.0 for r in response_ids]


def mean_reward(prompt_ids, response_ids):
    return [float(np.mean(r)) / VOCAB if len(r) else 0.0 for r in response_ids]


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return rj.load(tiny_checkpoints["llama_mqa_tied"][0])


@pytest.fixture(scope="module")
def torch_lm(tiny_checkpoints):
    return tiny_checkpoints["llama_mqa_tied"][1]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                                   max_position_embeddings=128)
    model = randomise(transformers.LlamaForSequenceClassification(cfg), seed=11)
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path, safe_serialization=True)
    return rj.rewards.ModelReward.load(str(path))


def greedy_reference(lm, prompts, n_new, eos):
    return rj.generate(lm, prompts, method="ar", temperature=0.0, max_new_tokens=n_new, eos=eos)


# ------------------------------------------------------------------------------------------------------------------
# ARGS
# ------------------------------------------------------------------------------------------------------------------


def test_args_w0_and_k1_are_greedy(lm, reward_model):
    ref = greedy_reference(lm, PROMPTS, N_NEW, EOS)
    for reward, kw in ((last_token_reward, dict(weight=0.0)), (last_token_reward, dict(k=1, weight=5.0)),
                       (reward_model, dict(weight=0.0)), (reward_model, dict(k=1, weight=5.0))):
        out = rj.args(lm, PROMPTS, reward, max_new_tokens=N_NEW, eos=EOS, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_args_cached_rewards_equal_full_reread(lm, reward_model):
    out = rj.args(lm, PROMPTS, reward_model, k=5, weight=3.0, max_new_tokens=N_NEW, eos=EOS, return_trace=True)
    cands, rewards = out.stats["trace"]["candidates"], out.stats["trace"]["rewards"]
    changed = 0
    for b, prompt in enumerate(PROMPTS):
        for t in range(out.lengths[b]):
            prefix = out.tokens[b, :t].tolist()
            full = reward_model.score([prompt] * 5, [prefix + [int(v)] for v in cands[b, t]])
            np.testing.assert_allclose(rewards[b, t], full, atol=2e-5)
        # the reward changed the choice somewhere: the search is not greedy decoding
        changed += int(out.tokens[b, 0] != cands[b, 0, 0])
    greedy = greedy_reference(lm, PROMPTS, N_NEW, EOS)
    assert changed > 0 or not np.array_equal(out.tokens, greedy.tokens)
    # the host path (the same reward model called on re-read prefixes) makes the same choices
    host = rj.args(lm, PROMPTS, lambda p, r: reward_model.score(p, r), k=5, weight=3.0, max_new_tokens=N_NEW,
                   eos=EOS)
    np.testing.assert_array_equal(host.tokens, out.tokens)
    np.testing.assert_allclose(out.scores, reward_model.score(PROMPTS, [row[:n].tolist() for row, n in zip(
        out.tokens, out.lengths)]), atol=2e-5)
    # counters: one prompt pass + one call of k rows per position (cached); k rows per live prompt (host)
    steps = out.stats["steps"]
    assert steps == int(out.lengths.max())
    assert out.stats["target_forwards"] == 1 + steps and out.stats["reward_calls"] == 1 + steps
    assert out.stats["reward_tokens"] == sum(map(len, PROMPTS)) + steps * 2 * 5
    assert host.stats["reward_rows"] == 5 * int(out.lengths.sum())


def test_args_stochastic_first_token_law(lm, torch_lm):
    import torch
    k, w, tau, rows = 6, 2.0, 0.7, 4000
    prompt = [3, 8, 1]
    out = rj.args(lm, [prompt] * rows, last_token_reward, k=k, weight=w, greedy=False, tau=tau, max_new_tokens=1,
                  eos=[], seed=5)
    with torch.no_grad():
        logits = torch_lm(torch.tensor([prompt])).logits[0, -1].numpy().astype(np.float64)
    top = np.argsort(-logits, kind="stable")[:k]
    s = logits[top] + w * np.array(last_token_reward(None, [[v] for v in top]))
    p = np.exp((s - s.max()) / tau)
    p /= p.sum()
    freq = np.array([(out.tokens[:, 0] == v).mean() for v in top])
    assert freq.sum() == 1.0  # every draw is one of the top-k
    # each frequency within 4.5 standard errors of softmax(s / tau)
    se = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-9), (freq, p)


def test_args_authors_code_counts_and_errors(lm):
    out = rj.args(lm, PROMPTS, last_token_reward, mode="authors_code", max_new_tokens=N_NEW, k=4)
    # no EOS stop: every row runs the whole budget; one target step and one reward call per position
    assert (out.lengths == N_NEW).all()
    assert out.stats["target_forwards"] == 1 + N_NEW and out.stats["reward_calls"] == N_NEW
    assert out.stats["reward_rows"] == N_NEW * 2 * 4
    with pytest.raises(ValueError, match="greedy"):
        rj.args(lm, PROMPTS, last_token_reward, mode="authors_code", greedy=False)
    with pytest.raises(ValueError, match="mode"):
        rj.args(lm, PROMPTS, last_token_reward, mode="fast")
    with pytest.raises(ValueError, match="k="):
        rj.args(lm, PROMPTS, last_token_reward, k=VOCAB + 1)


# ------------------------------------------------------------------------------------------------------------------
# CARDS and item-level rejection sampling
# ------------------------------------------------------------------------------------------------------------------

def pair_reward(prompt_ids, response_ids):
    """Distinct values for the responses of two tokens (no ties), 0 for the empty response."""
    return [((r[0] * 31 + r[1] * 17) % 97) / 97.0 if len(r) >= 2 else 0.0 for r in response_ids]


def test_cards_and_rs_with_every_first_candidate_accepted_are_plain_sampling(lm):
    ninf = float("-inf")
    plain = rj.generate(lm, PROMPTS, method="ar", temperature=1.0, top_k=40, max_new_tokens=N_NEW, eos=EOS, seed=4)
    out = rj.cards(lm, PROMPTS, mean_reward, tau_r=ninf, min_segment=2, max_segment=4, max_new_tokens=N_NEW,
                   eos=EOS, seed=4)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert out.stats["fallbacks"] == 0 and out.stats["accepted"] == out.stats["steps"]
    out = rj.cards(lm, PROMPTS, mean_reward, tau_r=-1e9, max_new_tokens=N_NEW, eos=EOS, seed=4)  # default segments
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    plain = rj.generate(lm, PROMPTS, method="ar", temperature=1.0, max_new_tokens=N_NEW, eos=EOS, seed=4)
    out = rj.rejection_sampling(lm, PROMPTS, mean_reward, tau_r=ninf, max_new_tokens=N_NEW, eos=EOS, seed=4)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert (out.chosen == 0).all()
    # authors_code samples at beta and ignores EOS
    plain = rj.generate(lm, PROMPTS, method="ar", temperature=0.8, top_k=40, max_new_tokens=N_NEW, eos=[], seed=4)
    out = rj.cards(lm, PROMPTS, mean_reward, tau_r=ninf, mode="authors_code", max_new_tokens=N_NEW, seed=4)
    np.testing.assert_array_equal(out.tokens, plain.tokens)


def closed_form_rs_law(pi, r, tau, beta, m):
    """The exact law of "first of m - 1 candidates accepted with prob min(1, e^{(r - tau)/beta}), else the best of
    m" for candidates drawn i.i.d. from pi (distinct rewards): what the one-at-a-time loop samples."""
    a = np.minimum(1.0, np.exp((r - tau) / beta))
    acc = pi * a
    big_a = acc.sum()
    direct = acc * sum((1 - big_a) ** j for j in range(m - 1))
    rho = pi * (1 - a)
    le = np.array([rho[r <= x].sum() for x in r])
    lt = np.array([rho[r < x].sum() for x in r])
    ple = np.array([pi[r <= x].sum() for x in r])
    plt_ = np.array([pi[r < x].sum() for x in r])
    return direct + le ** (m - 1) * ple - lt ** (m - 1) * plt_


def two_token_law(torch_lm, prompt, top_k):
    """pi over the top_k x top_k two-token responses (top-k filtered, temperature 1), from transformers."""
    import torch
    with torch.no_grad():
        first = torch_lm(torch.tensor([prompt])).logits[0, -1].numpy().astype(np.float64)
    ys, probs = [], []
    t1 = np.argsort(-first, kind="stable")[:top_k]
    p1 = np.exp(first[t1] - first[t1].max())
    p1 /= p1.sum()
    for v, pv in zip(t1, p1):
        with torch.no_grad():
            nxt = torch_lm(torch.tensor([prompt + [int(v)]])).logits[0, -1].numpy().astype(np.float64)
        t2 = np.argsort(-nxt, kind="stable")[:top_k]
        p2 = np.exp(nxt[t2] - nxt[t2].max())
        p2 /= p2.sum()
        for w, pw in zip(t2, p2):
            ys.append((int(v), int(w)))
            probs.append(pv * pw)
    return ys, np.array(probs)


@pytest.mark.parametrize("method", ["cards", "rs"])
def test_batched_first_accepted_rule_has_the_sequential_law(lm, torch_lm, method):
    """Two-token responses, one segment each (so the rising threshold is tau_r at t = N): the frequencies of the
    batched draw-m-then-take-the-first-accepted rule match the closed-form law of the sequential loop."""
    prompt, rows, m, tau_r, beta = [7, 3, 9], 3000, 4, 0.8, 0.25
    ys, pi = two_token_law(torch_lm, prompt, 3)
    r = np.array(pair_reward(None, [list(y) for y in ys]))
    assert len(set(r)) == len(r)
    expect = closed_form_rs_law(pi, r, tau_r, beta, m)
    assert abs(expect.sum() - 1) < 1e-9
    kw = dict(beta=beta, max_tries=m, max_new_tokens=2, top_k=3, temperature=1.0, eos=[], seed=9)
    if method == "cards":
        out = rj.cards(lm, [prompt] * rows, pair_reward, tau_r=tau_r, min_segment=2, max_segment=2, **kw)
        assert all(s == [2] for s in out.stats["segments"])
    else:
        out = rj.rejection_sampling(lm, [prompt] * rows, pair_reward, tau_r=tau_r, **kw)
    got = [tuple(row[:2].tolist()) for row in out.tokens]
    freq = np.array([sum(g == y for g in got) for y in ys]) / rows
    se = np.sqrt(expect * (1 - expect) / rows)
    assert np.all(np.abs(freq - expect) <= 4.5 * se + 1e-3), (freq, expect)
    assert 0 < out.stats["fallbacks"] < rows  # both branches of the rule were taken
    # the sequential loop's counts follow from the outcome: one reward call per candidate it would have drawn
    assert out.stats["sequential"]["reward_calls"] >= rows + (m - 1) * out.stats["fallbacks"]


def test_cards_segment_boundaries_follow_the_entropy_rule(lm, torch_lm):
    import torch
    from rss_jax.decoding.cards import threshold
    # hand-computed thresholds: rho0 = 0.5 * 0.2 + 0.5 * 1.0 = 0.6
    np.testing.assert_allclose(threshold([0, 5, 10, 20], 0.2, 1.0, 0.5, 10), [0.6, 0.8, 1.0, 1.0])
    n_new, min_seg, max_seg = 24, 2, 5
    # a tau_u at the model's median entropy, so that both entropy ends and length ends happen
    with torch.no_grad():
        lp = torch.log_softmax(torch_lm(torch.tensor([list(range(1, 40))])).logits[0], -1).numpy()
    tau_u = float(np.median(-(np.exp(lp) * lp).sum(-1)))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9, 8]]
    out = rj.cards(lm, prompts, mean_reward, tau_r=0.55, tau_u=tau_u, min_segment=min_seg, max_segment=max_seg,
                   max_tries=3, max_new_tokens=n_new, eos=EOS, seed=2)
    kinds = set()
    for b, prompt in enumerate(prompts):
        resp = out.tokens[b, : out.lengths[b]].tolist()
        with torch.no_grad():
            lp = torch.log_softmax(torch_lm(torch.tensor([prompt + resp])).logits[0].double(), -1).numpy()
        ent = -(np.exp(lp) * lp).sum(-1)[len(prompt):]  # entropy after each response token
        segs, count = [], 0
        for j, tok in enumerate(resp):
            count += 1
            by_entropy = count >= min_seg and ent[j] >= tau_u
            if by_entropy or count == max_seg or tok in EOS or j + 1 == n_new:
                kinds.add("entropy" if by_entropy else "other")
                segs.append(count)
                count = 0
        assert segs == out.stats["segments"][b]
        ends = np.cumsum(segs)
        np.testing.assert_allclose(out.stats["thresholds"][b],
                                   threshold(ends, out.stats["r0"][b], 0.55, 0.5, n_new), atol=1e-12)
    assert kinds == {"entropy", "other"}


def test_search_baselines_counters_in_authors_code(lm, tiny_checkpoints):
    """Counts derived by hand for the released loops (no EOS stop, so every row runs the whole budget)."""
    draft = rj.load(tiny_checkpoints["qwen2_bias"][0])
    b = len(PROMPTS)
    # RS, every first response accepted: one prefill and N - 1 fed tokens per prompt, one reward call per prompt
    out = rj.rejection_sampling(lm, PROMPTS, mean_reward, tau_r=float("-inf"), mode="authors_code",
                                max_new_tokens=N_NEW, max_tries=3)
    assert out.stats["sequential"]["reward_calls"] == b and out.stats["sequential"]["target_forwards"] == b * N_NEW
    # TreeBoN's released loop: fixed 4-token segments over 12 tokens = 3 segments per prompt
    seg, n_new = 4, 12
    out = rj.treebon(lm, PROMPTS, mean_reward, dpo=draft, mode="authors_code", tau_r=float("-inf"),
                     segment_tokens=seg, max_new_tokens=n_new, max_tries=3)
    assert all(s == [seg] * 3 for s in out.stats["segments"])
    seq = out.stats["sequential"]
    assert seq["reward_calls"] == b * (1 + 3)  # r(prompt) + one per accepted first candidate
    assert seq["small_forwards"] == seq["reward_calls"]
    assert seq["target_forwards"] == b * (1 + n_new) + seq["reward_calls"]  # decode + the reference's scoring
    # batched: one prefill, 3 draws of 4 steps; reward calls: r0 + one per draw
    assert out.stats["reward_calls"] == 4 and out.stats["target_forwards"] == 1 + 3 * seg + 4
    # never accepted: every step draws all max_tries candidates and takes the best
    out = rj.treebon(lm, PROMPTS, mean_reward, dpo=draft, mode="authors_code", tau_r=float("inf"),
                     segment_tokens=seg, max_new_tokens=n_new, max_tries=3)
    seq = out.stats["sequential"]
    assert out.stats["fallbacks"] == b * 3
    assert seq["reward_calls"] == b * (1 + 3 * 3)
    assert seq["target_forwards"] == b * (1 + 3 * 3 * seg) + seq["reward_calls"]
    with pytest.raises(ValueError, match="tau_r"):
        rj.treebon(lm, PROMPTS, mean_reward, dpo=draft, mode="authors_code")


# ------------------------------------------------------------------------------------------------------------------
# TreeBoN
# ------------------------------------------------------------------------------------------------------------------


def torch_logprobs(model, seq):
    import torch
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1).numpy()


def test_treebon_implicit_rewards_match_numpy(tiny_checkpoints):
    from rss_jax.decoding.treebon import ImplicitReward
    (p_dir, p_t), (r_dir, r_t) = tiny_checkpoints["llama_mqa_tied"], tiny_checkpoints["qwen2_bias"]
    pol, ref = rj.load(p_dir), rj.load(r_dir)
    prompts, resps = [[1, 2, 3], [4, 5, 6, 7, 8]], [[9, 10, 11, 12], [13]]
    paper = ImplicitReward(pol, ref, shifted=True).score(prompts, resps)
    authors = ImplicitReward(pol, ref, shifted=False).score(prompts, resps)
    for i, (p, r) in enumerate(zip(prompts, resps)):
        seq = p + r
        lp, lr = torch_logprobs(p_t, seq), torch_logprobs(r_t, seq)
        # paper: next-token log-probs of the response tokens, weights 1 / (k + 1)
        want = sum((lp[len(p) + k - 1, tok] - lr[len(p) + k - 1, tok]) / (k + 1) for k, tok in enumerate(r))
        np.testing.assert_allclose(paper[i], want, atol=1e-4)
        # released code: row i read at token i, over the whole sequence, weights 1 / (i + 1)
        want = sum((lp[j, tok] - lr[j, tok]) / (j + 1) for j, tok in enumerate(seq))
        np.testing.assert_allclose(authors[i], want, atol=1e-4)


def test_treebon_one_layer_is_bon_and_the_tree_shares_parents(lm, tiny_checkpoints):
    draft = rj.load(tiny_checkpoints["qwen2_bias"][0])
    bon = rj.best_of_n(lm, PROMPTS, mean_reward, n=8, max_new_tokens=N_NEW, eos=EOS, seed=6)
    one = rj.treebon(lm, PROMPTS, mean_reward, n=8, n_children=2, n_layers=1, dpo=draft, sft=lm,
                     max_new_tokens=N_NEW, eos=EOS, seed=6)
    np.testing.assert_array_equal(one.tokens, bon.tokens)
    np.testing.assert_array_equal(one.candidates, bon.candidates)
    np.testing.assert_allclose(one.scores, bon.scores)
    tree = rj.treebon(lm, PROMPTS, mean_reward, n=8, n_children=2, n_layers=3, dpo=draft, sft=lm,
                      max_new_tokens=N_NEW, eos=[], seed=6)
    stops = tree.stats["stops"]
    assert stops == [4, 8, 10]
    cand = tree.candidates
    # children 2p, 2p + 1 share their parent's tokens up to the last pruning, and differ afterwards somewhere
    np.testing.assert_array_equal(cand[:, 0::2, : stops[1]], cand[:, 1::2, : stops[1]])
    assert (cand[:, 0::2, stops[1]:] != cand[:, 1::2, stops[1]:]).any()
    # the budget of BoN(8): 8 rows x N tokens; the first layer's rows are BoN's rows
    assert tree.stats["generated_tokens"] == 2 * 8 * N_NEW
    assert tree.stats["target_forwards"] == N_NEW and tree.stats["small_forwards"] == 4
    # the kept parents after layer 1 are the best half by the implicit reward of the first-layer rows
    from rss_jax.decoding.treebon import ImplicitReward
    bon_free = rj.best_of_n(lm, PROMPTS, mean_reward, n=8, max_new_tokens=N_NEW, eos=[], seed=6)
    first = bon_free.candidates[:, :, : stops[0]]
    rp = ImplicitReward(draft, lm).score([p for p in PROMPTS for _ in range(8)],
                                         [row.tolist() for row in first.reshape(-1, stops[0])]).reshape(2, 8)
    for b in range(2):
        top = set(np.argsort(-rp[b], kind="stable")[:4].tolist())
        # the last layer descends from parents kept at both prunings: a subset of the first pruning's survivors
        kept = {int(np.flatnonzero((first[b] == cand[b, j, : stops[0]]).all(1))[0]) for j in range(8)}
        assert kept <= top
        np.testing.assert_allclose(tree.stats["cutoffs"][0][b], np.sort(rp[b])[::-1][3], atol=1e-5)


def test_treebon_implicit_reward_of_feature_heads_matches_a_prefix_loop(lm):
    """Two heads of the target (with different taps): each response token's log-ratio, recomputed from the prefix alone (the target run on
    x + y_<k, the head on its features), weighted 1 / (k + 1); tokens outside the draft vocabulary add nothing."""
    import jax.numpy as jnp
    from rss_jax.decoding.treebon import ImplicitReward
    ids = list(range(0, VOCAB, 2))  # half the vocabulary
    pol = rj.heads.new_head(lm, taps=(0, 1), token_ids=ids, seed=1)
    ref = rj.heads.new_head(lm, taps=(1,), token_ids=ids, seed=2)  # other taps: each head reads its own
    prompts, resps = [[1, 2, 3], [4, 6]], [[8, 9, 10, 12], [14, 15, 16]]
    got = ImplicitReward(pol, ref, target=lm).score(prompts, resps)
    t = lm.module
    embed = t.token_embeddings().astype(jnp.float32)
    rows = jnp.take(t.output_matrix(), jnp.asarray(ids), axis=0).astype(jnp.float32)
    for i, (p, r) in enumerate(zip(prompts, resps)):
        total = 0.0
        for k, tok in enumerate(r):
            if tok not in ids:
                continue
            prefix = jnp.asarray([p + r[:k]])
            lps = []
            for h in (pol, ref):
                _, _, taps = t(prefix, return_hidden=True, taps=tuple(h.config.taps))
                head = h.module
                # the last slot (feature of token L-2, token L-1) predicts token L
                logits, _, _ = head(head.fuse(taps[:, :-1].astype(jnp.float32)), prefix[:, 1:], embed, rows)
                lps.append(float(jax_log_softmax(np.asarray(logits[0, -1], np.float64))[ids.index(tok)]))
            total += (lps[0] - lps[1]) / (k + 1)
        np.testing.assert_allclose(got[i], total, atol=1e-4)
    assert np.isfinite(got).all()


def jax_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
