# Two commands for a fresh machine (see README.md):
#   make quickstart   install into .venv, write the demo data, train runs/quickstart.toml on 2 MPI ranks
#   make test         install into .venv, lint + type-check, unit tests, MPI tests at 1, 2 and 4 ranks
# On a cluster, set TORCH to the CUDA build you want (e.g. TORCH=torch) and MPI_EXTRA= to keep the
# system MPI instead of the PyPI Open MPI wheel; DALI_EXTRA= leaves NVIDIA DALI out (its tests are skipped).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MPI_EXTRA ?= ,localmpi
DALI_EXTRA ?= ,dali
NP ?= 2
MPI_SIZES ?= 1 2 4
RUN ?= runs/quickstart.toml
BIN := $(VENV)/bin

# Open MPI as root and with more ranks than cores (CI runs as root on 2 cores); harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_rmaps_base_oversubscribe := 1
export PY_COLORS := 0

.PHONY: quickstart test lint unit mpi-tests

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH)" -e ".[test,dev$(MPI_EXTRA)$(DALI_EXTRA)]"
	touch $@

data/demo/val:
	$(BIN)/hpcngd data demo data/demo

quickstart: $(BIN)/.installed data/demo/val
	$(BIN)/mpiexec -n $(NP) $(BIN)/hpcngd $(RUN)

lint: $(BIN)/.installed
	$(BIN)/ruff check hpcngd tests benchmarks
	$(BIN)/ruff format --check hpcngd tests benchmarks
	$(BIN)/mypy

unit: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -p no:cacheprovider tests/unit tests/e2e tests/gpu

# Each MPI size runs the same tests; `timeout` turns a hang into a failure. CI leaves out 8 ranks
# (`make mpi-tests MPI_SIZES=8`, see README).
mpi-tests: $(BIN)/.installed
	set -e; for n in $(MPI_SIZES); do \
	  echo "== tests/mpi under mpiexec -n $$n =="; \
	  OMP_NUM_THREADS=1 timeout 900 $(BIN)/mpiexec -n $$n $(BIN)/python -m pytest -q -p no:cacheprovider \
	    --with-mpi tests/mpi; \
	done

test: lint unit mpi-tests
