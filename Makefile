# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install torch==2.13.0 first (the CPU build on disk here) and then
# the package with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-flower-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raysys data demo --out data/digits
	$(BIN)/raysys run jobs/configs/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check raysys jobs bench tests
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check raysys jobs bench tests
	$(BIN)/ruff format --check raysys jobs bench tests

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/rescale_latency.py

# Benchmark-only: Flower's simulation engine for bench/cross_silo.py, in a venv of its own (flwr
# pins another Ray than ours). torch==2.13.0 first, pinned, so flwr cannot pull another build.
.venv-flwr/.installed:
	test -x .venv-flwr/bin/python || $(PY) -m venv .venv-flwr
	.venv-flwr/bin/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > .venv-flwr/constraints.txt
	.venv-flwr/bin/pip install --quiet -c .venv-flwr/constraints.txt "flwr[simulation]==1.42.0" pyarrow numpy
	touch .venv-flwr/.installed

bench-flower-venv: .venv-flwr/.installed

clean:
	rm -rf $(VENV) data/digits .pytest_cache
