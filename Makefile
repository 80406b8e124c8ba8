# The two commands of the product: `make build-bundle` and `make test`. Everything sets up itself.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test test-fast lint bench build-bundle gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/gen-proto.sh proto/edgedistill/v1/inference.proto
	scripts/setup.sh
	touch $@

test: setup
	$(PY) -m pytest -q -ra --durations=25

lint: setup
	$(PY) -m ruff check services tests bench testkit
	$(PY) -m ruff format --check services tests bench testkit
	$(PY) -m mypy
	$(VENV)/bin/hadolint --failure-threshold error docker/*.Dockerfile
	$(VENV)/bin/shellcheck -x scripts/*.sh

bench: setup
	$(PY) -m bench

SPEC ?= examples/ticket_triage/spec.yaml

# Distill the spec (default: the embedded ticket-triage example, teacher = gold labels) into a
# bundle under build/, build the images, pack dist/<name>-<version>.tar (scripts/build-bundle.sh
# lists the knobs). TEACHER_MODEL=openai/gpt-4o (and its key) distills from an API model.
build-bundle: setup
	SPEC=$(SPEC) scripts/build-bundle.sh

# The build host check on a CUDA GPU (scripts/gpu-check.sh; DEVICE=cpu for the reference).
gpu-check: setup
	scripts/gpu-check.sh

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache services/core/api/edgedistill
