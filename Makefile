# fusionops — `make demo` runs the whole pipeline on the demo data; `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The venv is reinstalled only when pyproject.toml or requirements.lock changes (the stamp carries their hash).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)

# Offline: no telemetry lookups, no hub downloads. The values are src/fusionops/offline.py's, read from it.
OFFLINE_ENV := $(shell sed -nE 's/^ *"([A-Z_]+)": "([^"]*)",.*/\1=\2/p' src/fusionops/offline.py)
$(foreach setting,$(OFFLINE_ENV),$(eval export $(setting)))
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help install lock data demo test lint clean platform-up platform-status platform-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install fusionops with its dev tools, at the versions of requirements.lock

lock: install ## upgrade .venv to the newest versions pyproject.toml allows and write them to requirements.lock
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	{ sed -n '/^#/p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	@rm -f $(VENV)/.installed-* && touch $(VENV)/.installed-$$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)
	@echo "requirements.lock updated: run dvc repro, then commit requirements.lock and dvc.lock"

data/raw/manifest.csv: | $(STAMP)
	@# The raw data is the project's copy of the demo dataset, versioned by DVC (data/raw.dvc).
	rm -rf data/raw && cp -r data/demo/emoji-v1 data/raw
	$(BIN)/dvc add --quiet data/raw

data: data/raw/manifest.csv ## put the demo dataset in data/raw (DVC-tracked)

demo: install data ## run the Prefect flow training_pipeline on the demo data, end to end
	$(BIN)/python flows/training_pipeline.py

test: install ## run the test suite
	$(BIN)/python -m pytest

lint: install ## ruff
	$(BIN)/ruff check src flows tests bench

platform-up: install ## start PostgreSQL, MLflow and Prefect servers, a worker; deploy prefect.yaml
	$(BIN)/fusionops platform up

platform-status: install ## each platform service, its URL and whether it answers
	$(BIN)/fusionops platform status

platform-down: install ## stop what platform-up started
	$(BIN)/fusionops platform down

clean: ## remove pipeline outputs (keeps .venv, the feature cache and the MLflow store)
	rm -rf data/prepared/*.csv data/features models
