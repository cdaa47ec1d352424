# Two commands for a new user: `make train` and `make test` (`make test-fast`: unit tests only, under a minute).
# Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test test-fast lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python examples/train_mnist.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/data_path.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/seed_process.py
	$(BIN)/python benchmarks/time_to_accuracy.py

clean-venv:
	rm -rf $(VENV)
