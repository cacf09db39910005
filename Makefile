# `make run`: set up .venv and run the main job; `make test`: set up and run lint + tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job, CPU-sized: the whole study on synthetic data into ./mlflow.db and ./report.
run: setup
	$(BIN)/cifarexp lab --preset quick --dataset synthetic

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	# Two test processes (pytest-xdist), one thread each on the 2 cores; the slowest listed.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) mlflow.db mlartifacts report .pytest_cache .ruff_cache
