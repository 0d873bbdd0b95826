"""The `rss-jax` command line: conversion, clear errors with exit code 2."""
from __future__ import annotations

import numpy as np

import rss_jax as rj
from rss_jax.cli import main


def test_convert_then_load(tiny_checkpoints, tmp_path, capsys):
    src = tiny_checkpoints["gpt2"][0]
    out = tmp_path / "converted"
    assert main(["convert", src, str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    tokens = np.arange(2, 12)[None]
    np.testing.assert_array_equal(np.asarray(rj.load(str(out)).logits(tokens)), np.asarray(rj.load(src).logits(tokens)))
    assert main(["convert", src, str(out)]) == 2  # exists: refused, with the reason on stderr
    assert "exists" in capsys.readouterr().err


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rss-jax: error:") and "no such file or folder" in err


def test_train_head_recipes(tiny_checkpoints, tmp_path, capsys):
    """`rss-jax train head-distill` then `head-dpo` on a tiny target (token-id data), and clear errors."""
    import json
    src = tiny_checkpoints["llama_mqa_tied"][0]
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(3, 90, 4).tolist(), "response_ids": rng.integers(3, 90, 8).tolist()}
            for _ in range(8)]
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "head"
    args = ["train", "head-distill", "--target", src, "--data", str(data), "--output", str(out), "--steps", "3",
            "--batch-size", "4", "--taps", "0,1", "--vocab", "40", "--ttt-steps", "2", "--no-progress",
            "--eval-data", str(data)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["eval_alpha"]) == 2 and (out / "metrics.jsonl").exists()
    head = rj.load(summary["final"])
    assert head.config.taps == (0, 1) and len(head.config.token_ids) >= 40
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt_ids": r["prompt_ids"], "chosen_ids": r["response_ids"],
                                         "rejected_ids": r["response_ids"][::-1]}) + "\n" for r in rows))
    dpo = ["train", "head-dpo", "--target", src, "--sft", summary["final"], "--data", str(pairs), "--output",
           str(tmp_path / "dpo"), "--steps", "2", "--batch-size", "4", "--ttt-steps", "2", "--no-progress"]
    assert main(dpo) == 0
    assert rj.load(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"]).config.taps == (0, 1)
    # the same output folder again without --resume, and a model given as --sft: one-line errors, exit 2
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    bad = dpo[:dpo.index("--sft") + 1] + [src] + dpo[dpo.index("--sft") + 2:]
    bad[bad.index("--output") + 1] = str(tmp_path / "dpo2")
    assert main(bad) == 2 and "not a feature-draft head" in capsys.readouterr().err
