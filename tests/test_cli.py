"""The `rss-jax` command line: every generate method on tiny models (in process, and a few runs of the real entry
point as subprocesses), resume, info, bench, help examples, and one-line errors with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

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
    # a second decoder layer appended to the trained head, trained on
    deeper = ["train", "head-distill", "--target", src, "--data", str(data), "--output", str(tmp_path / "deep"),
              "--steps", "2", "--batch-size", "4", "--ttt-steps", "2", "--no-progress", "--init", summary["final"],
              "--depth", "2"]
    assert main(deeper) == 0
    deep = rj.load(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"])
    assert deep.config.depth == 2
    assert main(["info", deep.source, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["decoder layers"] == 2 and info["parameters"] == deep.num_params > head.num_params
    assert info["proposal temperature"] == "the sampling temperature's"
    dataclasses.replace(deep, draft_temperature_scale=0.85).save(str(tmp_path / "calibrated"))
    assert main(["info", str(tmp_path / "calibrated"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["proposal temperature"].startswith("0.85 x")
    # the same output folder again without --resume, and a model given as --sft: one-line errors, exit 2
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    bad = dpo[:dpo.index("--sft") + 1] + [src] + dpo[dpo.index("--sft") + 2:]
    bad[bad.index("--output") + 1] = str(tmp_path / "dpo2")
    assert main(bad) == 2 and "not a feature-draft head" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# rss-jax generate / info / bench: every method from the command line, resume, one-line errors
# ------------------------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# four prompts of token ids; row 2 starts with 77, which the test reward can be told to stop at (an interruption)
ROWS = [{"prompt_ids": [3, 4, 5], "id": "r0"}, {"prompt_ids": [6, 7, 8, 9, 10]}, {"prompt_ids": [77, 12, 13]},
        {"prompt_ids": [14, 15, 16, 17]}]
REWARD_PY = '''
import os

def score(prompt_ids, response_ids):
    """A programmatic reward: response length plus a token-dependent fraction (few ties)."""
    if os.environ.get("RSS_JAX_TEST_INTERRUPT") and any(p[0] == 77 for p in prompt_ids):
        raise KeyboardInterrupt
    return [len(r) + (sum(r) % 7) / 7 for r in response_ids]
'''
COMMON = ["--max-new-tokens", "3", "--batch-size", "2", "--no-progress"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(x) for x in open(path)]


def run_cli(args, stdin=None):
    """rss-jax as a subprocess (the entry point is rss_jax.cli:main)."""
    return subprocess.Popen([sys.executable, "-m", "rss_jax.cli", *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(err: str) -> str:
    """The single `rss-jax: error:` line of stderr (nothing like a traceback)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("rss-jax: error: "), err
    assert sum(x.startswith("rss-jax: error") for x in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def one_line_err(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def cli_models(tiny_checkpoints, tmp_path_factory):
    """Paths: a tiny target, two drafts over its vocabulary, a copy of the target with a word-level tokenizer and a
    chat template, a tiny reward model, a reward file, a 4-row input."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tests.conftest import VOCAB, randomise
    d = tmp_path_factory.mktemp("cli")
    paths = {"target": tiny_checkpoints["llama_mqa_tied"][0], "draft": tiny_checkpoints["llama_gqa_llama3rope"][0],
             "sft": tiny_checkpoints["qwen2_bias"][0], "other": tiny_checkpoints["gpt2"][0]}
    tok_model = d / "with_tokenizer"
    shutil.copytree(paths["target"], tok_model)
    words = ["<unk>", "<eos>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(tok_model)
    paths["tok_model"] = str(tok_model)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    randomise(transformers.LlamaForSequenceClassification(cfg), seed=7).save_pretrained(d / "rm",
                                                                                        safe_serialization=True)
    paths["rm"] = str(d / "rm")
    (d / "reward.py").write_text(REWARD_PY)
    paths["reward"] = f"{d / 'reward.py'}:score"
    paths["input"] = write_jsonl(d / "in.jsonl", ROWS)
    paths["dir"] = d
    return paths


def method_args(p):
    """The command line of each method on the tiny models (few candidates, 3 new tokens)."""
    r = ["--reward", p["reward"]]
    return {
        "ar": [], "sd": ["--draft", p["draft"], "--k", "2"],
        "sss": ["--draft", p["draft"], "--sft", p["sft"], "--k", "2"],
        "eft": ["--draft", p["draft"], "--sft", p["sft"]],
        "bon": ["--n", "2", *r], "soft-bon": ["--n", "2", "--beta", "2", *r],
        "spr": ["--n", "4", "--alpha", "0.5", "--stops", "2", *r],
        "gsi": ["--draft", p["draft"], "--n", "2", "--max-step-tokens", "2", *r],
        "rsd": ["--draft", p["draft"], "--max-step-tokens", "2", "--delta", "2.5", *r],
        "args": ["--k", "3", "--reward", p["rm"]],  # a reward-model folder: ARGS' cached path
        "cards": ["--tau-r", "2", "--max-tries", "2", "--min-segment", "1", "--max-segment", "2", *r],
        "rs": ["--tau-r", "2.5", "--max-tries", "2", *r],
        "treebon": ["--draft", p["draft"], "--sft", p["sft"], "--n", "4", "--n-children", "2", "--n-layers", "2",
                    *r],
    }


@pytest.fixture(scope="module")
def method_runs(cli_models):
    """Every method once on the 4-row input (batches of 2), in process: method -> output path."""
    p = cli_models
    outs = {}
    for method, extra in method_args(p).items():
        out = str(p["dir"] / f"out-{method}.jsonl")
        argv = ["generate", "--model", p["target"], "--method", method, "--input", p["input"], "--output", out,
                *COMMON, *extra]
        assert main(argv) == 0, method
        outs[method] = out
    return outs


def test_generate_every_method(method_runs, cli_models):
    from rss_jax.cli_generate import REWARD_METHODS
    for method, out in method_runs.items():
        rows = read_jsonl(out)
        assert [r["index"] for r in rows] == [0, 1, 2, 3], method
        assert [r["prompt_ids"] for r in rows] == [x["prompt_ids"] for x in ROWS]
        assert rows[0]["id"] == "r0" and rows[0]["text"] is None  # input fields kept; no tokenizer, no text
        assert [r["batch"] for r in rows] == [[0, 2], [0, 2], [2, 4], [2, 4]]
        for r in rows:
            assert r["method"] == method and 1 <= r["num_tokens"] == len(r["token_ids"]) <= 3
            assert all(0 <= t < 96 for t in r["token_ids"])
            assert isinstance(r["stats"], dict) and not any(k.endswith("_s") for k in r["stats"])  # no timings
            assert (r.get("score") is not None) == (method in REWARD_METHODS)
    # per-row keys: the CLI's batches of 2 (prompt_offset = batch start) give one library call's tokens
    lm = rj.load(cli_models["target"])
    ref = rj.generate(lm, [x["prompt_ids"] for x in ROWS], max_new_tokens=3, seed=0)
    assert [r["token_ids"] for r in read_jsonl(method_runs["ar"])] == [
        ref.tokens[i][:ref.lengths[i]].tolist() for i in range(4)]
    # best-of-n's answer is the best of its candidates under the reward
    for r in read_jsonl(method_runs["bon"]):
        assert r["score"] == max(r["candidate_scores"]) and len(r["candidate_scores"]) == 2


def test_resume_gives_the_uninterrupted_file(method_runs, cli_models, tmp_path, monkeypatch, capsys):
    """A run on the first 3 rows, resumed on all 4, and a run interrupted in its second batch, resumed: both files
    equal the uninterrupted run's, byte for byte (bon: keys depend on the batch; ar: keys by prompt index)."""
    p = cli_models
    half = write_jsonl(tmp_path / "half.jsonl", ROWS[:3])
    for method in ("bon", "ar"):
        out = str(tmp_path / f"{method}.jsonl")
        base = ["generate", "--model", p["target"], "--method", method, "--output", out, *COMMON,
                *method_args(p)[method]]
        assert main(base + ["--input", half]) == 0
        assert len(read_jsonl(out)) == 3
        assert main(base + ["--input", p["input"]]) == 2  # exists: refused without --resume
        assert "--resume" in capsys.readouterr().err
        assert main(base + ["--input", p["input"], "--resume"]) == 0
        assert open(out).read() == open(method_runs[method]).read(), method
    # a real interruption: the reward raises KeyboardInterrupt in the second batch
    out = tmp_path / "interrupted.jsonl"
    partial = tmp_path / ".interrupted.jsonl.partial"
    base = ["generate", "--model", p["target"], "--method", "bon", "--input", p["input"], "--output", str(out),
            *COMMON, *method_args(p)["bon"]]
    monkeypatch.setenv("RSS_JAX_TEST_INTERRUPT", "1")
    capsys.readouterr()
    assert main(base) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists() and len(read_jsonl(partial)) == 2
    monkeypatch.delenv("RSS_JAX_TEST_INTERRUPT")
    assert main(base + ["--resume"]) == 0
    assert not partial.exists() and out.read_text() == open(method_runs["bon"]).read()
    # other settings are refused
    assert main(base + ["--resume", "--seed", "1"]) == 2
    assert "other settings" in one_error_line(capsys.readouterr().err)


def test_generate_subprocess_prompt_stdin_and_error(cli_models):
    """The real entry point: --prompt text with a tokenizer, JSONL from stdin to stdout, a one-line error."""
    p = cli_models
    text = run_cli(["generate", "--model", p["tok_model"], "--prompt", "a b c", "--prompt", "d e", "--max-new-tokens",
                    "3", "--temperature", "0"])
    piped = run_cli(["generate", "--model", p["target"], "--method", "sss", "--draft", p["draft"], "--sft", p["sft"],
                     "--k", "2", "--output", "-", *COMMON])
    bad = run_cli(["generate", "--model", p["target"], "--output", str(p["dir"] / "never.jsonl")])
    out, err = text.communicate()
    assert text.returncode == 0, err
    assert "=== [0] a b c" in out and "=== [1] d e" in out and "| method" in out
    out, err = piped.communicate("".join(json.dumps(r) + "\n" for r in ROWS))
    assert piped.returncode == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["method"] == "sss" for r in rows)
    assert "| method" in err  # the summary goes to stderr when stdout carries the rows
    _, err = bad.communicate('{"prompt_ids": [1, 2]}\n{"prompt_ids": [1, 2\n')
    assert bad.returncode == 2
    assert one_error_line(err).startswith("rss-jax: error: <stdin>:2: not valid JSON")
    assert not (p["dir"] / "never.jsonl").exists()


def test_text_prompts_and_info(cli_models, capsys):
    """--prompt goes through the chat template; `info` reads family, size, vocabulary, template, memory."""
    p = cli_models
    assert main(["generate", "--model", p["tok_model"], "--prompt", "a b", "--max-new-tokens", "2",
                 "--output", str(p["dir"] / "text.jsonl"), "--no-progress"]) == 0
    row = read_jsonl(p["dir"] / "text.jsonl")[0]
    assert row["prompt"] == "a b" and isinstance(row["text"], str) and row["prompt_ids"] == [2, 3]
    capsys.readouterr()
    assert main(["info", p["tok_model"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"].startswith("llama") and info["vocabulary"] == 28 and info["embedding rows"] == 96
    n = sum(int(np.prod(v.shape)) for v in rj.load(p["target"]).params().values())
    assert info["parameters"] == n and info["memory float32"].endswith("KiB")
    assert info["chat template"].startswith("yes: {% for m in messages %}")
    assert main(["info", p["target"]]) == 0
    out = capsys.readouterr().out
    assert "chat template" in out and "no (prompts must be token ids)" in out
    head = rj.heads.new_head(rj.load(p["target"]), taps=(0, 1), seed=1).save(str(p["dir"] / "head"))
    assert main(["info", head, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "feature-draft head" and "llama" in info["target"]
    assert info["taps (target layers read)"] == [0, 1]


def test_one_line_errors(cli_models, tmp_path, monkeypatch, capsys):
    """Each expected failure: one `rss-jax: error: <problem>; <fix>` line, a non-zero exit, no output file."""
    import transformers
    from tests.conftest import randomise
    p = cli_models
    out = tmp_path / "out.jsonl"
    small_vocab = tmp_path / "vocab80"
    randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))).save_pretrained(small_vocab, safe_serialization=True)
    other_head = rj.heads.new_head(rj.load(p["other"]), seed=2).save(str(tmp_path / "other_head"))
    truncated = tmp_path / "truncated"
    shutil.copytree(p["target"], truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    (tmp_path / "folder.jsonl").mkdir()
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt_ids": [1, 2]}\n\n{"prompt_ids": [1, 2],}\n')
    no_prompt = write_jsonl(tmp_path / "noprompt.jsonl", [{"text": "hi"}])
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt_ids": [1, 2]}, {"prompt_ids": [3] * 126}])
    good = p["input"]
    g = ["generate", "--model", p["target"], "--output", str(out), "--no-progress"]
    cases = [  # (argv, expected text in the error line)
        (g + ["--input", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file; check the path"),
        (g + ["--input", str(tmp_path / "folder.jsonl")], "is a folder; give a JSONL file"),
        (g + ["--input", str(malformed)], "bad.jsonl:3: not valid JSON"),
        (g + ["--input", no_prompt], 'noprompt.jsonl:1: no "prompt" or "prompt_ids" field'),
        (g + ["--input", long_prompt, "--max-new-tokens", "8"], "long.jsonl:2: the prompt's 126 tokens + "
         "--max-new-tokens 8 exceed the model's context of 128 positions; shorten the prompt"),
        (["generate", "--model", str(tmp_path / "missing"), "--input", good, "--output", str(out)],
         "no such file or folder"),
        (["generate", "--model", "not-a-model", "--input", good, "--output", str(out)], "not a built-in model name"),
        (["generate", "--model", str(truncated), "--input", good, "--output", str(out)], "model.safetensors"),
        (g + ["--input", good, "--method", "nope"], "argument --method: invalid choice: 'nope'"),
        (g + ["--input", good, "--method", "args", "--mode", "exact"],
         "--mode exact is not a mode of --method args; choose one of paper, authors_code"),
        (g + ["--input", good, "--mode", "paper"], "--mode paper is not a mode of --method ar; drop --mode"),
        (g + ["--input", good, "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
        (g + ["--input", good, "--method", "sd", "--draft", p["draft"], "--k", "0"], "argument --k: must be >= 1"),
        (g + ["--input", good, "--method", "sss", "--draft", p["draft"], "--sft", p["draft"], "--mode", "paper",
              "--draft-temperature", "0.5"], "--draft-temperature needs --mode exact"),
        (g + ["--input", good, "--method", "sd", "--draft", p["draft"], "--draft-temperature", "0"],
         "argument --draft-temperature: must be > 0"),
        (g + ["--input", good, "--top-p", "1.5"], "argument --top-p: must be <= 1"),
        (g + ["--input", good, "--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
        (g + ["--input", good, "--n", "4"], "--n does not apply to --method ar"),
        (g + ["--input", good, "--method", "cards", "--reward", p["reward"]], "--method cards needs --tau-r"),
        (g + ["--input", good, "--method", "sd"], "--method sd needs --draft"),
        (g + ["--input", good, "--method", "sd", "--draft", str(small_vocab)], "has 80 embedding rows but --model"),
        (g + ["--input", good, "--method", "gsi", "--draft", str(small_vocab), "--reward", p["reward"]],
         "do not share a vocabulary"),
        (g + ["--input", good, "--method", "sd", "--draft", other_head], "feature-draft head was made for a target "
         "with family='gpt2'"),
        (g + ["--input", good, "--method", "bon"], "VADER reward scores text but the model"),
        (g + ["--input", good, "--method", "bon", "--reward", str(tmp_path / "r.py") + ":f"], "r.py: no such file"),
        (g + ["--input", good, "--method", "bon", "--reward", "nonsense"], "unknown --reward 'nonsense'"),
        (g + ["--prompt", "hello"], "the prompt is text but the model"),
        (g + ["--input", good, "--mesh", "rows=2"], "bad mesh item 'rows=2'"),
        (g + ["--input", good, "--mesh", "data=3"], "3"),
        (["info", str(tmp_path / "missing")], "no such file or folder"),
        (["bench", "nope"], "argument name: invalid choice"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) != 0, argv
        line = one_error_line(capsys.readouterr().err)
        assert expected in line and "; " in line, (argv, line)
        assert not out.exists() and not (tmp_path / ".out.jsonl.partial").exists(), argv
    # no prompt options and stdin a terminal: nothing to read
    monkeypatch.setattr(sys, "stdin", type("TTY", (), {"isatty": lambda self: True})())
    assert main(g) == 2
    assert "no prompts; give --prompt TEXT, --input FILE.jsonl, or pipe JSONL" in one_line_err(capsys)
    # out of memory while compiling (simulated: XLA's message), then --debug shows the traceback instead
    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    monkeypatch.setattr(rj, "generate", oom)
    assert main(g + ["--input", good, "--max-new-tokens", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "out of memory while compiling or running --method ar with --batch-size 8" in line
    assert "lower --batch-size" in line
    assert not out.exists() and not (tmp_path / ".out.jsonl.partial").exists()
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        main(g + ["--input", good, "--max-new-tokens", "3", "--debug"])


def test_help_examples_and_bench(monkeypatch, capsys):
    for cmd in ([], ["generate"], ["info"], ["demo"], ["convert"], ["bench"], ["train"], ["train", "dpo"],
                ["train", "head-distill"]):
        assert main([*cmd, "--help"]) == 0
        assert capsys.readouterr().out.rstrip().split("\n\n")[-1].startswith("example"), cmd
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert main(["bench", "decode", "--batch", "1", "--help"]) == 0
    assert calls[0][1].endswith(os.path.join("scripts", "bench_decode.py")) and calls[0][2:] == ["--batch", "1",
                                                                                                  "--help"]


def test_train_errors_name_the_problem_and_the_fix(tiny_checkpoints, tmp_path, capsys):
    """`rss-jax train dpo` on bad data: one line with the file, the line number where there is one and a fix after
    the semicolon; exit 2; no output folder left behind."""
    src = tiny_checkpoints["llama_mqa_tied"][0]
    good = {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9]}
    files = {
        "malformed": '{"prompt_ids": [3, 4]}\n{"prompt_ids": [3, 4],}\n',
        "not_object": json.dumps(good) + "\n[1, 2]\n",
        "empty": "\n\n",
        "no_prompt": json.dumps({"chosen_ids": [6], "rejected_ids": [7]}) + "\n",
        "no_rejected": json.dumps({"prompt_ids": [3], "chosen_ids": [6]}) + "\n",
        "empty_response": json.dumps({**good, "chosen_ids": []}) + "\n",
        "ids_not_ints": json.dumps({**good, "rejected_ids": ["a"]}) + "\n",
        "outside_vocab": json.dumps({**good, "chosen_ids": [6, 10 ** 6]}) + "\n",
        "text_no_tokenizer": json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n",
    }
    expected = {
        "malformed": ("malformed.jsonl:2: malformed JSON", "one JSON object per line"),
        "not_object": ("not_object.jsonl:2: expected a JSON object", "write one object per line"),
        "empty": ("holds no examples", "add one JSON object per line"),
        "no_prompt": ("no_prompt.jsonl:1: missing field 'prompt'", "add the prompt"),
        "no_rejected": ("no_rejected.jsonl:1: missing field 'rejected'", "dpo data needs"),
        "empty_response": ("empty_response.jsonl:1: empty response 'chosen_ids'", "drop the line"),
        "ids_not_ints": ("'rejected_ids' must be a list of integer token ids", "give a list such as"),
        "outside_vocab": ("token id 1000000 outside the vocabulary", "re-tokenise"),
        "text_no_tokenizer": ("is text but the model has no tokenizer", "as a list of token ids instead"),
    }
    cases = []
    for name, text in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        cases.append((["--data", str(path)], expected[name]))
    cases.append((["--data", str(tmp_path / "nope.jsonl")], ("nope.jsonl: no such data file", "check the --data")))
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(good) + "\n")
    cases.append((["--data", str(ok), "--steps", "0"], ("argument --steps: must be >= 1", "rss-jax train dpo --help")))
    cases.append((["--data", str(ok), "--learning-rate", "x"], ("argument --learning-rate: expected a number", "--help")))
    cases.append((["--data", str(ok), "--label-smoothing", "0.7"], ("must be <= 0.5", "--help")))
    for extra, (problem, fix) in cases:
        out = tmp_path / "run"
        capsys.readouterr()
        argv = ["train", "dpo", "--policy", src, "--output", str(out), "--no-progress"] + extra
        argv += [] if "--steps" in extra else ["--steps", "2"]
        assert main(argv) == 2, extra
        line = one_error_line(capsys.readouterr().err)
        assert problem in line and fix in line and "; " in line, (extra, line)
        assert not out.exists(), extra
