# Everyday tasks. Each target runs inside the active Python environment (make install first, in
# a virtualenv); `make ci` is what CI runs, minus the fresh virtualenv (see .ci/run).
PYTHON ?= python

.PHONY: help install gen gen-check lint format typecheck imports test check ci bench bench-quick fuzz crash-soak replica-soak

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

install:  ## install Venna for development (editable, with the dev extras)
	$(PYTHON) -m pip install -e '.[dev]'

gen:  ## regenerate the contract's Python modules from protos/
	$(PYTHON) scripts/gen_protos.py

gen-check:  ## fail if the generated code is stale
	$(PYTHON) scripts/gen_protos.py --check

lint:  ## ruff, ruff format --check, buf lint
	ruff check .
	ruff format --check .
	$(PYTHON) scripts/lint_protos.py

format:  ## apply ruff's fixes and formatting
	ruff check --fix .
	ruff format .

typecheck:  ## strict mypy
	mypy

imports:  ## the dependency direction between packages (contracts in pyproject.toml)
	lint-imports

test:  ## the test suite (the README's command)
	pytest

check: gen-check lint typecheck imports  ## everything but the tests

ci: check test  ## what CI runs

bench:  ## the echo-path benchmark, about 2 minutes
	$(PYTHON) scripts/bench.py

bench-quick:  ## a smoke run of the benchmark
	$(PYTHON) scripts/bench.py --quick

fuzz:  ## five minutes of generated requests against a venna serve process
	$(PYTHON) scripts/fuzz.py --minutes 5

crash-soak:  ## twenty SIGKILLs under load, counting what was lost
	$(PYTHON) scripts/crash_soak.py --kills 20

replica-soak:  ## two replicas on PostgreSQL, one SIGKILLed twenty times: what the other settles
	$(PYTHON) scripts/replica_soak.py --kills 20
