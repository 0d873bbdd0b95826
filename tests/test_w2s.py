"""The weak-to-strong pipeline (`rss-jax w2s`) end to end, small: a tiny random target with the built-in model's
tokenizer (so responses are text that VADER, AFINN and TextBlob can score), two random feature-draft heads, three
prompts, eight new tokens, tiny budgets, every method. Checks the JSON's fields, that a re-run reuses every chunk,
that a run killed mid-way and resumed gives the same numbers, the BoN pool's identity with separate BoN runs, and
the report."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from rss_jax import heads as rheads
from rss_jax import w2s, w2s_report
from rss_jax.lm import from_params
from rss_jax.loading import resolve_builtin
from rss_jax.loading.names import flatten
from rss_jax.loading.tokenizer import load_tokenizer
from rss_jax.models import ModelConfig, build_model
from rss_jax.models.feature_head import HeadConfig, init_head

pytest.importorskip("afinn")
pytest.importorskip("textblob")

FIELDS = ("gold_reward_mean", "gold_reward_se", "afinn_mean", "textblob_mean", "wall_s_per_token",
          "target_calls_per_token", "reward_calls_per_token", "acceptance_rate", "new_tokens", "target_nll_mean",
          "target_nll_se")


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer(gguf_file=resolve_builtin("smollm2-135m-instruct"))
    vocab = len(tok)
    eos = tuple(int(t) for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if t is not None)
    cfg = ModelConfig(family="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=eos,
                      tie_word_embeddings=True)
    lm = from_params(cfg, flatten(nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))), tokenizer=tok,
                     source="tiny-w2s-target")
    # the draft vocabulary: common word pieces (a few hundred ids) and the end-of-turn ids
    ids = sorted(set(range(200, 700)) | set(eos))
    heads = []
    for seed, taps in ((1, (0, 1)), (2, (1,))):
        hcfg = HeadConfig.for_target(cfg, taps, ids)
        flat = flatten(nnx.to_pure_dict(nnx.state(init_head(hcfg, seed))))
        heads.append(rheads.from_flat(hcfg, flat, source=f"tiny-head-{seed}"))
    return lm, heads[0], heads[1]


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("w2s")
    s = w2s.Settings(**w2s.TINY)
    out = root / "summary.json"
    summary = w2s.run(s, str(root / "work"), str(out), str(root / "docs" / "RESULTS.md"), tiny_model=tiny,
                      command="pytest")
    return s, root, summary


def test_every_method_has_every_field(first_run):
    s, root, summary = first_run
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["eval_prompts"] == s.eval_prompts and on_disk["command"] == "pytest"
    expected = {"vanilla", "bon_2", f"bon_{s.n_max}", "soft_bon_2", "sd_sft", "sd", "sss_exact", "sss_paper",
                "sss_authors_code", "eft", "args", "cards", "rs", "treebon", "gsi", "rsd"} | \
        {w2s.spr_key(*c) for c in s.spr}
    assert set(on_disk["methods"]) == expected
    for name, e in on_disk["methods"].items():
        for f in FIELDS:
            assert f in e, (name, f)
        assert e["new_tokens"] > 0 and e["wall_s_per_token"] > 0 and e["target_calls_per_token"] > 0, name
        assert -1 <= e["gold_reward_mean"] <= 1 and -1 <= e["textblob_mean"] <= 1, name
        assert e["target_nll_mean"] > 0, name
    m = on_disk["methods"]
    for name in ("sd_sft", "sd", "sss_exact", "sss_paper", "sss_authors_code"):
        assert 0 <= m[name]["acceptance_rate"] <= 1 and len(m[name]["acceptance_by_offset"]) == s.k
        assert m[name]["tokens_per_target_call"] >= 1
    assert m["vanilla"]["reward_calls_per_token"] == 0 and m["vanilla"]["acceptance_rate"] is None
    # BoN(n) costs about n target rows per returned token (EOS can end rows early), the pool the most
    assert m[f"bon_{s.n_max}"]["target_calls_per_token"] > m["bon_2"]["target_calls_per_token"]


def test_bon_variants_equal_their_own_runs(first_run):
    """BoN(2) and soft BoN(2) read off the BoN(4) pool are token for token what separate calls return."""
    _, _, summary = first_run
    assert summary["methods"]["bon_2"]["same_tokens_as_pool"] is True
    assert summary["methods"]["soft_bon_2"]["same_tokens_as_pool"] is True


def _direct_nll(lm, prompt, text):
    """The target's mean NLL per token of `text` after `prompt`: one unpadded forward, log-softmax in NumPy."""
    from rss_jax.decoding.common import encode_prompts
    p = encode_prompts(lm, [prompt])[0]
    r = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not r:
        return None
    logits = np.asarray(lm.logits([p + r]))[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.mean([logp[len(p) + j - 1, t] for j, t in enumerate(r)])


def test_fluency_is_the_targets_nll_of_each_response(first_run, tiny):
    """The examples' target NLL per token (read back through the cache, the length-sorted batches and the split per
    artifact and BoN variant) equals a direct forward of the target on each prompt + response, one at a time."""
    _, _, summary = first_run
    checked = 0
    for name in ("vanilla", "bon_2", "sss_exact", "cards"):
        for ex in summary["methods"][name]["examples"]:
            want = _direct_nll(tiny[0], ex["prompt"], ex["text"])
            if want is None:
                assert ex["target_nll"] is None
                continue
            assert ex["target_nll"] == pytest.approx(want, rel=1e-4), name
            checked += 1
    assert checked >= 6


def test_fluency_cache_follows_the_texts(first_run, tiny, tmp_path, monkeypatch):
    """A chunk whose texts changed (one run again) and one whose cache is gone are scored afresh, every response of
    them matches a direct forward, and nothing else is scored again."""
    import shutil

    import rss_jax.likelihood
    s, root, _ = first_run
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    edited = w2s._art_path(str(work), s, "quality", "vanilla", s.chunk)
    art = json.loads(open(edited).read())
    art["texts"] = [t + " Wonderful, wonderful day." for t in art["texts"]]
    w2s._write_json(edited, art)
    pool = w2s._art_path(str(work), s, "quality", "bon_pool", 0)
    os.remove(w2s._fluency_path(pool))
    scored = []
    real = rss_jax.likelihood.response_nll

    def counting(lm, prompts, responses, **k):
        scored.extend(responses)
        return real(lm, prompts, responses, **k)
    monkeypatch.setattr(rss_jax.likelihood, "response_nll", counting)
    monkeypatch.setattr(w2s, "run_chunk", lambda *a, **k: pytest.fail("a finished chunk was run again"))
    w2s.run(s, str(work), str(tmp_path / "s.json"), None, tiny_model=tiny, command="pytest")
    pool_art = json.loads(open(pool).read())
    expect = art["texts"] + pool_art["texts"] + sum((v["texts"] for v in pool_art["variants"].values()), [])
    assert sorted(scored) == sorted(expect)
    for path, a in ((edited, art), (pool, pool_art)):
        groups = json.loads(open(w2s._fluency_path(path)).read())["groups"]
        for name, (prompts, texts) in w2s._fluency_groups(a).items():
            for p, t, n, c in zip(prompts, texts, groups[name]["nll"], groups[name]["tokens"]):
                want = _direct_nll(tiny[0], p, t)
                assert (c == 0 and want is None) or n / c == pytest.approx(want, rel=1e-4), (path, name)


def test_rerun_reuses_every_chunk(first_run, tiny, monkeypatch):
    s, root, summary = first_run

    def refuse(*a, **k):
        raise AssertionError("a finished chunk was run again")
    monkeypatch.setattr(w2s, "run_chunk", refuse)
    import rss_jax.likelihood
    monkeypatch.setattr(rss_jax.likelihood, "response_nll", refuse)  # and its fluency is cached too
    again = w2s.run(s, str(root / "work"), str(root / "again.json"), None, tiny_model=tiny, command="pytest")
    for name, e in summary["methods"].items():
        assert again["methods"][name]["gold_reward_mean"] == e["gold_reward_mean"]
        assert again["methods"][name]["wall_s_per_token"] == e["wall_s_per_token"]
        assert again["methods"][name]["target_nll_mean"] == e["target_nll_mean"]


def test_killed_run_resumes_with_the_same_numbers(first_run, tiny):
    """Delete some finished chunks (a run killed before it reached them) and leave a half-written temporary file:
    the resumed run recomputes only those chunks, and every response and score is what the first run had."""
    s, root, summary = first_run
    work = root / "work"
    victims = [w2s._art_path(str(work), s, "quality", m, 0) for m in ("vanilla", "sss_exact", "bon_pool", "cards")]
    victims.append(w2s._art_path(str(work), s, "latency", "eft", 0))
    for v in victims:
        os.remove(v)
    open(victims[0] + ".tmp123", "w").write('{"half": ')
    ran = []
    real = w2s.run_chunk

    def counting(ctx, method, *a, **k):
        ran.append(method)
        return real(ctx, method, *a, **k)
    w2s.run_chunk, saved = counting, w2s.run_chunk
    try:
        again = w2s.run(s, str(work), str(root / "resumed.json"), None, tiny_model=tiny, command="pytest")
    finally:
        w2s.run_chunk = saved
    assert sorted(ran) == sorted(["vanilla", "sss_exact", "bon_pool", "cards", "eft"])
    for name, e in summary["methods"].items():
        r = again["methods"][name]
        for f in ("gold_reward_mean", "afinn_mean", "textblob_mean", "new_tokens", "acceptance_rate",
                  "target_nll_mean"):
            assert r[f] == e[f], (name, f)
        assert [x["text"] for x in r["examples"]] == [x["text"] for x in e["examples"]], name


def test_re_made_heads_rerun_only_the_methods_that_use_them(first_run, tiny, tmp_path, monkeypatch):
    """A head re-made under the same name changes no setting; its fingerprint in the artifacts makes exactly the
    chunks that draft with the heads (SD, SSS, EFT, TreeBoN; scored and batch-1) run again, and nothing else."""
    import shutil
    s, root, _ = first_run
    src, work = root / "work", tmp_path / "work"
    shutil.copytree(src, work)
    lm, sft, aligned = tiny
    other = rheads.from_flat(aligned.config, flatten(nnx.to_pure_dict(nnx.state(init_head(aligned.config, 7)))),
                             source="tiny-head-7")
    assert w2s.weights_fingerprint(sft, other) != w2s.weights_fingerprint(sft, aligned)
    # a calibrated proposal temperature draws other tokens: it changes the fingerprint too
    import dataclasses
    calibrated = dataclasses.replace(aligned, draft_temperature_scale=0.8)
    assert w2s.weights_fingerprint(sft, calibrated) != w2s.weights_fingerprint(sft, aligned)
    ran = []

    def replay(ctx, method, prompts, offset, index, timing=False):
        ran.append((method, offset, timing))
        with open(w2s._art_path(str(src), s, "latency" if timing else "quality", method, offset)) as f:
            return json.load(f)
    monkeypatch.setattr(w2s, "run_chunk", replay)
    w2s.run(s, str(work), str(tmp_path / "s.json"), None, tiny_model=(lm, sft, other), command="pytest")
    heads_methods = {"sd_sft", "sd", "sss_exact", "sss_paper", "sss_authors_code", "eft", "treebon"}
    assert {m for m, _, _ in ran} == heads_methods
    assert len(ran) == len(set(ran))  # each chunk once
    assert {t for m, _, t in ran if m == "sss_exact"} == {False, True}  # the scored and the batch-1 runs
    # the artifacts now carry the new fingerprint: a second run with the same heads runs nothing
    ran.clear()
    w2s.run(s, str(work), str(tmp_path / "s2.json"), None, tiny_model=(lm, sft, other), command="pytest")
    assert ran == []


def test_every_method_that_drafts_names_its_drafts():
    """Each planned method maps to the weights it drafts with: the heads, the v2 drafts, GSI/RSD's small model, or
    none (target-only methods); a method added later without a mapping shows up here."""
    prints = dict(heads="H", v2="V", small="S")
    uses = {m: w2s._uses(m, prints) for _, m, _, _ in w2s.plan(w2s.Settings(), with_v2=True)}
    drafting = {"sd_sft", "sd", "sss_exact", "sss_paper", "sss_authors_code", "eft", "treebon"}
    assert {m for m, u in uses.items() if u == "H"} == drafting
    assert {m for m, u in uses.items() if u == "V"} == {m + "_v2" for m in w2s.SPECULATIVE}
    assert {m for m, u in uses.items() if u == "S"} == {"gsi", "rsd"}
    assert {m for m, u in uses.items() if u is None} >= {"vanilla", "bon_pool", "args", "cards", "rs"}


def test_report_has_table_plots_and_examples(first_run):
    s, root, summary = first_run
    md = (root / "docs" / "RESULTS.md").read_text()
    for e in summary["methods"].values():
        assert f"| {e['label']}" in md
    assert "results/weak_to_strong_wall.png" in md and "results/weak_to_strong_forwards.png" in md
    for png in ("weak_to_strong_wall.png", "weak_to_strong_forwards.png"):
        assert (root / "docs" / "results" / png).stat().st_size > 1000
    assert "## Example outputs" in md and "SSS exact against vanilla" in md
    assert "| target NLL |" in md and "Fluency, the target's NLL per response token" in md
    # every table number comes from the JSON: the vanilla row's gold reward is printed from it
    assert f"{summary['methods']['vanilla']['gold_reward_mean']:.3f}" in md


def test_settings_key_changes_only_with_what_a_method_reads():
    s = w2s.Settings()
    assert s.key("vanilla") == dataclasses.replace(s, n_max=32, eval_prompts=300).key("vanilla")
    assert s.key("bon_pool") != dataclasses.replace(s, n_max=32).key("bon_pool")
    assert s.key("sss_exact") != dataclasses.replace(s, k=s.k + 1).key("sss_exact")
    assert s.key("vanilla") != dataclasses.replace(s, temperature=1.0).key("vanilla")


def test_bad_prompt_count_is_refused():
    with pytest.raises(ValueError, match="eval-prompts"):
        w2s.load_prompts(10 ** 6)
    with pytest.raises(ValueError, match="unknown --methods"):
        w2s.plan(w2s.Settings(), methods=["nope"])
    assert np.all([j[3] > 0 for j in w2s.plan(w2s.Settings(eval_prompts=7, search_prompts=5, chunk=3,
                                                           search_chunk=2))])
