# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv with pip on first use; torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
# `make demo` installs the runtime dependencies only; `make test` adds the test extras on top.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.facelens-runtime
TESTING := $(VENV)/.facelens-test
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint clean venv

venv: $(RUNTIME)

$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $(RUNTIME)

$(TESTING): $(RUNTIME)
	$(PIP) -e '.[test]'
	touch $(TESTING)

demo: $(RUNTIME)
	$(BIN)/facelens report --out out/report

test: $(TESTING)
	$(BIN)/python -m pytest -q

lint: $(TESTING)
	$(BIN)/ruff check src tests bench scripts

clean:
	rm -rf $(VENV) out .pytest_cache
