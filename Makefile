# Two entry points: `make demo` (set up, then run the whole workflow on the embedded demo cohort)
# and `make test` (set up, then lint and run the test suite). Everything lives in ./.venv.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# CPU wheel by default; on a GPU cluster e.g. `make setup TORCH="torch --index-url <CUDA wheel index>"`
TORCH ?= torch==2.13.0
CORES ?= 2
# pytest-xdist processes for `make test`; tests/conftest.py makes each test module one unit of work
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint pytest slurm-test benchmarks profile clean
.DEFAULT_GOAL := demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(PYTHON) -m pip install --user -q virtualenv && $(PYTHON) -m virtualenv $(VENV); }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create .venv with torch first, then wsiscan and its dependencies

demo: setup ## run the whole workflow on the embedded demo cohort (results/)
	$(BIN)/snakemake --profile profiles/local --cores $(CORES)

lint: setup ## ruff, snakefmt and snakemake --lint; any finding fails
	$(BIN)/ruff check scripts tests benchmarks
	$(BIN)/ruff format --check scripts tests benchmarks
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint --cores 1

pytest: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: lint pytest ## lint, then the whole test suite

slurm-test: setup ## only the real-SLURM test (root; installs munge/slurm from Debian packages)
	$(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

benchmarks: setup ## the performance table (benchmarks/README.md)
	$(BIN)/python -m benchmarks.run

profile: setup ## make `snakemake --profile slurm` find this repository's SLURM profile
	$(BIN)/wsiscan install-profile

clean:
	rm -rf results data .snakemake
