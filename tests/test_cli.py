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
