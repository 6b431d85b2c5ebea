# One-command setup: `make demo` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast test-all lint lint-duplicates format demo demo-train clean

setup: $(STAMP)

# torch first, pinned: left to the resolver, torchvision's pin pulls another torch build (and torchvision must match
# torch exactly, or open_clip and sentence-transformers fail to import); then the project.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,teachers,lint]"
	touch $(STAMP)

# `slow` tests (B = 2048 O(B^3) losses on the CPU: ~10 CPU-minutes) run with `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ray"

test-all: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint + format check), mypy (pyproject [tool.mypy]), and pylint's duplicate-code check alone (R0801:
# no block of 6+ equal lines twice in orchestrator/ or methods/; imports, docstrings, comments, signatures ignored).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) -s lint-duplicates

lint-duplicates: $(STAMP)
	$(VENV)/bin/pylint --disable=all --enable=R0801 --min-similarity-lines=6 --ignore-imports=y \
	    --ignore-docstrings=y --ignore-comments=y --ignore-signatures=y --score=n orchestrator methods

# Rewrites the files ruff can fix (imports, formatting); `make lint` checks the rest.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The main job: a 4-trial ablation over loss families (search_spaces/smoke.yaml) on the built-in synthetic data.
demo: $(STAMP)
	$(VENV)/bin/itr sweep search_spaces/smoke.yaml

# One experiment through Ray Train, recorded in MLflow.
demo-train: $(STAMP)
	$(VENV)/bin/itr train configs/demo.yaml

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache .itr_cache
