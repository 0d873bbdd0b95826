"""Bad input to the loaders: every error names the file and the problem."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import rss_jax as rj
from rss_jax.loading import CheckpointError, ConfigError


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        rj.load(str(tmp_path / "nope"))


def test_unknown_architecture(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["gpt2"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "bert"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: unknown architecture model_type='bert'"):
        rj.load(str(dst))


def test_wrong_shapes(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["llama_mqa_tied"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\..*shape"):
        rj.load(str(dst))


def test_truncated_safetensors(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["opt"][0], tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        rj.load(str(dst))


def test_missing_tensor(tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    dst = _copy(tiny_checkpoints["qwen2_bias"][0], tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors for layers\.bk \(layers \[1\]\)"):
        rj.load(str(dst))


def test_pickle_refused(tiny_checkpoints, tmp_path):
    dst = _copy(tiny_checkpoints["gpt2"][0], tmp_path)
    os.remove(dst / "model.safetensors")
    (dst / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*pickle.*Convert it to safetensors"):
        rj.load(str(dst))
    with pytest.raises(CheckpointError, match="never unpickles"):
        rj.load(str(dst / "pytorch_model.bin"))


def test_corrupt_orbax_description(tiny_checkpoints, tmp_path):
    out = rj.load(tiny_checkpoints["gpt2"][0]).save(str(tmp_path / "o"))
    with open(os.path.join(out, "rss_jax.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=r"rss_jax\.json: corrupt"):
        rj.load(out)


def test_bad_dtype(tiny_checkpoints):
    with pytest.raises(ValueError, match="dtype must be one of"):
        rj.load(tiny_checkpoints["gpt2"][0], dtype="int8")


def test_reward_model_matches_transformers(tmp_path):
    """A sequence-classification reward model gives transformers' scores at the last non-pad token."""
    import torch
    import transformers
    from tests.conftest import VOCAB, randomise
    from rss_jax.loading import load_reward_model
    from flax import nnx
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = randomise(transformers.LlamaForSequenceClassification(cfg), seed=7)
    model.save_pretrained(tmp_path / "rm", safe_serialization=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (3, 10))
    lengths = np.array([10, 6, 3])
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(tokens != 0)).logits.numpy()[:, 0]
    graphdef, state, _, _ = load_reward_model(str(tmp_path / "rm"))
    ours = np.asarray(nnx.merge(graphdef, state).sequence_scores(tokens, lengths))[:, 0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
