"""The training package: DPO loss formulas (docs/algorithms.md §9), masking, data errors, DPO learning, bit-for-bit
resume through the command line, Orbax export, make_draft. Tiny random Llama models; every run shares one tiny
architecture so that equal step configurations reuse one compiled step."""
from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rss_jax
from rss_jax.lm import from_params
from rss_jax.loading.names import flatten
from rss_jax.models import build_model
from rss_jax.models.config import ModelConfig
import training
from training import DataError, TrainConfig, dpo_loss
from training.cli import add_train_parser, run_train

V = 64
TINY = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_lm(seed=0, config=TINY):
    return from_params(config, flatten(nnx.to_pure_dict(nnx.state(build_model(config, seed)))))


@pytest.fixture(scope="module")
def policy():
    return tiny_lm(0)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, policy):
    return policy.save(str(tmp_path_factory.mktemp("policy") / "tiny"))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def pair_records(n=8, seed=0):
    """Prompts of 3-7 random tokens; the chosen answers use tokens 5-8, the rejected ones 20-24 (varied lengths)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(1, V, size=int(rng.integers(3, 8))).tolist()
        out.append({"prompt_ids": prompt, "chosen_ids": [5, 6, 7, 8][: 1 + i % 4],
                    "rejected_ids": [20, 21, 22, 23, 24][: 1 + (i + 1) % 5]})
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_records())


# ---------------------------------------------------------------------------------------------------------------
# dpo_loss against the NumPy formulas of docs/algorithms.md §9


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_matches_numpy(loss_type, eps):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=16).astype(np.float32) for _ in range(4))
    beta = 0.3
    h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
    if loss_type == "sigmoid":
        want = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        want = (h - 1 / (2 * beta)) ** 2
    else:
        want = np.maximum(0.0, 1 - beta * h)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, loss_type=loss_type)
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m["losses"]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(m["rewards/chosen"]), (beta * (pc - rc)).mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), (beta * (pr - rr)).mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["margin"]), (beta * h).mean(), rtol=1e-4, atol=1e-4)
    assert float(m["accuracy"]) == pytest.approx(float(np.mean(beta * h > 0)))


def test_dpo_loss_invariants():
    lp = jnp.array([-12.0, -3.5, -40.0])
    lr = jnp.array([-9.0, -7.0, -1.0])
    beta = 0.2
    loss, m = dpo_loss(lp, lr, lp, lr, beta=beta)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m["rewards/chosen"]) == 0.0 and float(m["rewards/rejected"]) == 0.0
    assert float(dpo_loss(lp, lr, lp, lr, beta=beta, loss_type="ipo")[0]) == pytest.approx(1 / (4 * beta ** 2))
    assert float(dpo_loss(lp, lr, lp, lr, beta=beta, loss_type="hinge")[0]) == pytest.approx(1.0)
    # label smoothing 0.5: symmetric under swapping chosen and rejected, minimised at margin 0
    ref = jnp.zeros(3)
    a = dpo_loss(lp, lr, ref, ref, beta=beta, label_smoothing=0.5)[0]
    b = dpo_loss(lr, lp, ref, ref, beta=beta, label_smoothing=0.5)[0]
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert float(a) > math.log(2)
    c = dpo_loss(lp, lr, ref, ref, beta=beta, label_smoothing=0.2)[0]
    d = dpo_loss(lr, lp, ref, ref, beta=beta, label_smoothing=0.2)[0]
    assert abs(float(c) - float(d)) > 1e-3
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(lp, lr, lp, lr, loss_type="kto")


# ---------------------------------------------------------------------------------------------------------------
# data and masks


def tiny_chat_tokenizer():
    """A word-level tokenizer with a ChatML template, built in memory (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "\n", " ", "hello", "world", "good", "bad",
             "movie", "is", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" |\n|<\|im_start\|>|<\|im_end\|>"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def test_text_data_chat_template_masks_only_the_response(tmp_path):
    tok = tiny_chat_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "the movie", "response": "good movie"},
                                                {"prompt": "hello", "response": "bad"}])
    data = training.build_dataset(path, "sft", tok, max_length=64)
    assert data.tokens.shape == (2, 1, 16)  # longest example rounded up to a multiple of 8
    for i, (prompt, response) in enumerate([("the movie", "good movie"), ("hello", "bad")]):
        p_text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tok(response + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        n = len(p_ids) + len(r_ids)
        np.testing.assert_array_equal(data.tokens[i, 0, :n], p_ids + r_ids)
        np.testing.assert_array_equal(data.loss_mask[i, 0], [0] * len(p_ids) + [1] * len(r_ids) + [0] * (16 - n))
        assert data.n_tokens[i] == n


def test_sft_loss_ignores_prompt_and_padding(policy):
    tokens = np.array([[3, 9, 4, 11, 12, 13, 0, 0], [7, 8, 30, 31, 0, 0, 0, 0]], np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]], np.int32)

    forward = jax.jit(training.model_logits, static_argnums=0)

    def loss(tok):
        logits = forward(policy.graphdef, policy.state, jnp.asarray(tok))
        return float(training.masked_ce_sum(logits, jnp.asarray(tok), jnp.asarray(mask))), logits

    base, logits = loss(tokens)
    other_padding = tokens.copy()
    other_padding[0, 6:] = [40, 41]
    other_padding[1, 4:] = [50, 51, 52, 53]
    assert loss(other_padding)[0] == base  # padding is never seen by an earlier position, nor scored
    # the loss is the summed NLL of exactly the response tokens
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = -sum(lp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 8) if mask[b, t])
    assert base == pytest.approx(want, rel=1e-5)
    # no gradient reaches the logits that predict prompt or padding tokens
    g = np.asarray(jax.grad(lambda lg: training.masked_ce_sum(lg, jnp.asarray(tokens), jnp.asarray(mask)))(logits))
    scored = np.zeros((2, 8), bool)
    scored[:, :-1] = mask[:, 1:] == 1
    assert np.all(g[~scored] == 0) and np.all(np.abs(g[scored]).sum(-1) > 0)


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written


def test_bad_inputs_fail_before_writing(tmp_path, policy, pairs_file):
    out = tmp_path / "run"

    def run(data, **kw):
        cfg = dict(mode="dpo", policy=policy, data=data, output=str(out), steps=2, batch_size=2, progress=False)
        cfg.update(kw)
        return training.train(TrainConfig(**cfg))

    good = json.dumps(pair_records(1)[0])
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"prompt_ids": [1, 2], "chosen_ids": [3]', good])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        run(bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [good, {"prompt_ids": [1, 2], "chosen_ids": [3],
                                                          "rejected_ids": []}])
    with pytest.raises(DataError, match=r"empty\.jsonl:2: empty response 'rejected_ids'"):
        run(empty)
    with pytest.raises(DataError, match="fewer than one batch of 16"):
        run(pairs_file, batch_size=16)
    with pytest.raises(DataError, match="outside the vocabulary"):
        run(write_jsonl(tmp_path / "oov.jsonl", [{"prompt_ids": [1, V], "chosen_ids": [3], "rejected_ids": [4]}]))
    with pytest.raises(DataError, match="no tokenizer"):
        run(write_jsonl(tmp_path / "text.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2))
    other_vocab = tiny_lm(1, ModelConfig(**{**TINY.to_json(), "vocab_size": V + 16, "rope_scaling": {}}))
    with pytest.raises(ValueError, match="vocabulary of 80 tokens but the policy has 64"):
        run(pairs_file, reference=other_vocab)
    assert not out.exists()  # no half-written checkpoint (nor anything else)

    # the command line reports the same errors with exit code 2
    args = cli_args(["dpo", "--policy", "unused", "--data", bad, "--output", str(out), "--steps", "2"])
    args.policy = policy  # (an LM object passes straight through)
    assert run_train(args) == 2
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# training runs


def cli_args(argv):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv, "--no-progress"])


def pair_accuracy(lm, ref, data):
    """Chosen-over-rejected accuracy of the implicit reward log pi/pi_ref on every pair."""
    lp = np.asarray(training.pair_logps(lm.graphdef, lm.state, jnp.asarray(data.tokens), jnp.asarray(data.loss_mask)))
    rp = np.asarray(training.pair_logps(ref.graphdef, ref.state, jnp.asarray(data.tokens),
                                        jnp.asarray(data.loss_mask)))
    margin = (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])
    return float(np.mean(margin > 0)), lp


def test_dpo_run_raises_accuracy_and_exports(tmp_path, policy, pairs_file):
    data = training.build_dataset(pairs_file, "dpo", None, V)
    before, lp0 = pair_accuracy(policy, policy, data)
    assert before == 0.0  # reference = policy: every margin is exactly 0
    res = training.train(TrainConfig(mode="dpo", policy=policy, data=pairs_file, output=str(tmp_path / "dpo"),
                                     steps=12, batch_size=4, learning_rate=3e-3, seed=1, progress=False))
    after, lp1 = pair_accuracy(res.lm, policy, data)
    assert after == 1.0
    assert res.metrics[-1]["accuracy"] == 1.0 and res.metrics[-1]["loss"] < 0.5 < res.metrics[0]["loss"]
    assert res.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # metrics.jsonl: one line per step with the documented keys
    lines = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, 13))
    for key in ("step", "loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy", "tokens_per_s", "lr"):
        assert key in lines[-1]
    # the exported draft loads with rss_jax.load and gives the trained parameters' logits
    back = rss_jax.load(res.final)
    toks = np.asarray(data.tokens[:3, 0])
    np.testing.assert_array_equal(np.asarray(back.logits(toks)), np.asarray(res.lm.logits(toks)))
    assert not np.array_equal(np.asarray(back.logits(toks)), np.asarray(policy.logits(toks)))
    # the caller's policy was not touched (the step donates a private copy)
    np.testing.assert_array_equal(pair_accuracy(policy, policy, data)[1], lp0)


def test_precomputed_and_online_reference_agree(tmp_path, policy, pairs_file):
    common = dict(mode="dpo", policy=policy, data=pairs_file, steps=2, batch_size=4, learning_rate=3e-3,
                  seed=1, progress=False, export=False)
    pre = training.train(TrainConfig(output=str(tmp_path / "pre"), reference_mode="precompute", **common))
    onl = training.train(TrainConfig(output=str(tmp_path / "onl"), reference_mode="online", **common))
    for a, b in zip(pre.metrics, onl.metrics):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "margin"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert pre.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # a separate reference model (not the policy) works in both modes too
    ref = tiny_lm(7)
    r1 = training.train(TrainConfig(output=str(tmp_path / "r1"), reference=ref, **{**common, "steps": 1}))
    data = training.build_dataset(pairs_file, "dpo", None, V)
    lp = training.precompute_reference(policy, data, 4)
    rp = training.precompute_reference(ref, data, 4)
    idx = training.ExampleStream(len(data), 1).take(4)
    want, _ = dpo_loss(lp[idx, 0], lp[idx, 1], rp[idx, 0], rp[idx, 1], beta=0.1)
    assert r1.metrics[0]["loss"] == pytest.approx(float(want), rel=1e-5)


def test_stop_and_resume_is_bit_for_bit(tmp_path, policy_dir, pairs_file):
    base = ["dpo", "--policy", policy_dir, "--data", pairs_file, "--steps", "4", "--batch-size", "2",
            "--grad-accum", "2", "--learning-rate", "3e-3", "--seed", "3", "--warmup-steps", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run_train(cli_args(base + ["--output", full])) == 0
    assert run_train(cli_args(base + ["--output", part, "--stop-after", "2"])) == 0
    assert not os.path.exists(os.path.join(part, "final"))
    assert training.latest_checkpoint(part).endswith("step_00000002")
    # without --resume the finished part-run is not overwritten
    assert run_train(cli_args(base + ["--output", part])) == 2
    assert run_train(cli_args(base + ["--output", part, "--resume"])) == 0
    a, b = rss_jax.load(os.path.join(full, "final")), rss_jax.load(os.path.join(part, "final"))
    pa, pb = a.params(), b.params()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)
    la = [json.loads(x) for x in open(os.path.join(full, "metrics.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(part, "metrics.jsonl"))]
    assert [x["step"] for x in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy", "lr", "grad_norm"):
            assert x[k] == y[k], (x["step"], k)
    # a resumed run with other settings is refused
    assert run_train(cli_args([*base[:8], "5", *base[9:], "--output", part, "--resume"])) == 2


def distill_data(tmp_path, seed):
    """8 random prompt/response records in a JSONL file: (records, path, tokens [8, T], loss mask [8, T])."""
    rng = np.random.default_rng(seed)
    recs = [{"prompt_ids": rng.integers(1, V, 4).tolist(), "response_ids": rng.integers(1, V, 12).tolist()}
            for _ in range(8)]
    path = write_jsonl(tmp_path / "distill.jsonl", recs)
    data = training.build_dataset(path, "sft", None, V)
    return recs, path, jnp.asarray(data.tokens[:, 0]), jnp.asarray(data.loss_mask[:, 0])


def test_distill_tv_and_make_draft(tmp_path, policy):
    # a teacher with peaked distributions (weights x6), so that a truncated draft has something to learn
    teacher = from_params(TINY, {k: np.asarray(v) * (1 if "norm" in k else 6) for k, v in policy.params().items()})
    draft = training.make_draft(teacher, layers=[0, 2])
    assert draft.config.num_layers == 2
    np.testing.assert_array_equal(np.asarray(draft.params()["layers.wq"]),
                                  np.asarray(teacher.params()["layers.wq"])[[0, 2]])
    np.testing.assert_array_equal(np.asarray(draft.params()["embed_tokens"]),
                                  np.asarray(teacher.params()["embed_tokens"]))
    with pytest.raises(ValueError, match="outside"):
        training.make_draft(teacher, layers=[3])
    recs, path, toks, mask = distill_data(tmp_path, 5)

    def acceptance(lm):
        return float(training.acceptance(teacher.logits(toks)[:, :-1], lm.logits(toks)[:, :-1], mask[:, 1:]))

    res = training.train(TrainConfig(mode="distill", policy=teacher, init_layers="0,2", teacher=teacher, data=path,
                                     output=str(tmp_path / "d"), steps=8, batch_size=4, learning_rate=3e-3,
                                     distill_loss="tv", ce_weight=0.1, progress=False, export=False))
    assert res.lm.config.num_layers == 2
    assert res.metrics[-1]["tv"] < res.metrics[0]["tv"]
    assert acceptance(res.lm) > acceptance(draft) + 0.05


def test_frequent_token_ids_and_trimmed_head_training(tmp_path, policy):
    """trim_vocab keeps the most frequent ids (+ EOS); KL distillation of a trimmed student fits the teacher
    restricted to the kept ids (finite loss and gradients, acceptance rises); SFT data outside the head is refused."""
    ids = training.frequent_token_ids([[5, 5, 7, 9, 9, 9], [7, 3, -1]], 3, always=[1])
    assert ids == [1, 5, 9]  # 9 (x3) first, then 5 and 7 (x2) tie and the lower id wins the last slot
    with pytest.raises(ValueError, match="at least one"):
        training.frequent_token_ids([[1]], 0)
    teacher = from_params(TINY, {k: np.asarray(v) * (1 if "norm" in k else 6) for k, v in policy.params().items()})
    keep = list(range(0, V, 2))  # every even id
    draft = training.trim_vocab(training.make_draft(teacher, [0, 2]), keep)
    assert draft.config.head_token_ids == tuple(keep)
    recs, path, toks, mask = distill_data(tmp_path, 7)
    t_logits, d_logits = teacher.logits(toks), draft.logits(toks)
    loss = float(training.distill_sum(d_logits, t_logits, mask, "kl"))
    # NumPy oracle: KL(teacher restricted to the even ids and renormalised || student) summed over response positions
    t = np.asarray(t_logits, np.float64)[:, :-1][..., keep]
    s = np.asarray(d_logits, np.float64)[:, :-1][..., keep]
    lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    want = float(((np.exp(lt) * (lt - ls)).sum(-1) * np.asarray(mask)[:, 1:]).sum())
    assert loss == pytest.approx(want, rel=1e-4)

    def acceptance(lm):
        return float(training.acceptance(t_logits[:, :-1], lm.logits(toks)[:, :-1], mask[:, 1:]))

    # the trainer trims the student itself with head_vocab (draft_vocabulary of the data's responses)
    want_ids = training.draft_vocabulary([r["response_ids"] for r in recs], 40)
    assert len(want_ids) == 40 and set(training.frequent_token_ids([r["response_ids"] for r in recs], 20)) <= \
        set(want_ids)
    start = training.trim_vocab(training.make_draft(teacher, [0, 2]), want_ids)
    res = training.train(TrainConfig(mode="distill", policy=teacher, init_layers="0,2", head_vocab=40,
                                     teacher=teacher, data=path, output=str(tmp_path / "d"), steps=8, batch_size=4,
                                     learning_rate=3e-3, progress=False, export=False))
    assert all(np.isfinite(m["loss"]) for m in res.metrics)
    assert res.lm.config.head_token_ids == tuple(want_ids)
    assert acceptance(res.lm) > acceptance(start) + 0.02
    # DPO of a trimmed policy: responses inside its head, prompts (masked out) full of ids it cannot produce
    pairs = [{"prompt_ids": [1, 3, 5, 7][: 2 + i % 3], "chosen_ids": [4, 6, 8][: 1 + i % 3],
              "rejected_ids": [20, 22, 24, 26][: 1 + (i + 1) % 4]} for i in range(8)]
    dpo = training.train(TrainConfig(mode="dpo", policy=draft, data=write_jsonl(tmp_path / "p.jsonl", pairs),
                                     output=str(tmp_path / "dpo"), steps=4, batch_size=4, learning_rate=1e-2,
                                     progress=False, export=False))
    assert all(np.isfinite(m["loss"]) for m in dpo.metrics)
    assert dpo.metrics[-1]["margin"] > dpo.metrics[0]["margin"]
    with pytest.raises(DataError, match="trimmed head .* cannot produce"):
        training.train(TrainConfig(mode="sft", policy=draft, data=path, output=str(tmp_path / "s"), steps=1,
                                   batch_size=4, progress=False, export=False))
    assert not os.path.exists(tmp_path / "s")
