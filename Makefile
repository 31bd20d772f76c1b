# The two commands of the README. Each creates .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit promtool bench-drain bench-scaleout bench-pool clean

# setup.py builds the feature kernel (C) in place: a changed source rebuilds it.
$(STAMP): pyproject.toml setup.py fraudactors/features/_kernel.c
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python >= 3.11) on PATH, or run: make PY=python3 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fraudactors demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fraudactors loadgen tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers (pytest-xdist), each with its own embedded broker, Redis and Redis Cluster:
# most of a test's time is waiting (group joins, fault windows), so two halve the wall time on
# two cores. `make unit PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
unit: $(STAMP) promtool
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# tests/test_alert_rules.py runs `promtool test rules`; installed when missing (Debian's prometheus).
promtool:
	@command -v promtool >/dev/null 2>&1 || scripts/install-promtool.sh

test: lint typecheck unit

bench-drain: $(STAMP)
	$(BIN)/fraudactors bench drain $(ARGS)

bench-scaleout: $(STAMP)
	$(BIN)/fraudactors bench scaleout $(ARGS)

bench-pool: $(STAMP)
	$(BIN)/fraudactors bench pool $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
