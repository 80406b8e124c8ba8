# The two commands of the product: `make build-bundle` and `make test`. Everything sets up itself.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test test-fast lint bench build-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/gen-proto.sh proto/edgedistill/v1/inference.proto
	scripts/setup.sh
	touch $@

test: setup
	$(PY) -m pytest -q -ra

lint: setup
	$(PY) -m ruff check services tests bench
	$(PY) -m ruff format --check services tests bench
	$(PY) -m mypy

bench: setup
	$(PY) -m bench

build-bundle: setup
	@echo "build-bundle: the build pipeline arrives with issue 3 (see README)." >&2; exit 2

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache services/core/api/edgedistill
