# Common commands. `make demo` and `make test` do all set-up on a fresh machine.
# No Hub lookups at run time (an unreachable Hub costs ~25 s of retries per lookup).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# accelerate launch sets OMP_NUM_THREADS=1 on machines without GPUs unless told otherwise, which
# halves CPU throughput on 2 cores (measured: 354 vs 422 img/s on the quickstart).
NPROC := $(shell nproc 2>/dev/null || echo 1)
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-all test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install  ## the quickstart recipe end to end (teacher, student, evaluation, export)
	$(BIN)/accelerate launch --config_file accelerate_config.yaml --num_cpu_threads_per_process $(NPROC) \
		distill/train.py recipes/quickstart.yaml run.overwrite=true

# The suite runs in one pytest process per core (pytest-xdist): most of its time is end-to-end
# runs of tiny models, single-threaded Python more than arithmetic (tests/conftest.py gives each
# process its share of the cores).
test: install lint  ## lint, then the whole test suite
	$(BIN)/python -m pytest -n $(NPROC)

test-all: install lint  ## the whole suite and the extended end-to-end runs (shards, stream, teacher ensembles)
	$(BIN)/python -m pytest -n $(NPROC) -m ""

test-fast: install  ## unit tests only (no end-to-end runs)
	$(BIN)/python -m pytest -n $(NPROC) -m "not slow"

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs reports .pytest_cache .ruff_cache
