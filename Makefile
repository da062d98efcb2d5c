# The README's two commands, `make demo` and `make test`, set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
NBDEV_TEST_FLAGS ?=

.PHONY: install test unit integration demo bench export clean-venv

$(STAMP): requirements.lock setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

install: $(STAMP)

## make test: the notebooks' unit tests (nbdev_test), then the integration tests (pytest tests)
test: unit integration

unit: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 $(NBDEV_TEST_FLAGS)

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests

## make demo: generate the synthetic demo dataset, train the mae recipe on it, render the report
demo: $(STAMP)
	@test -f $(DEMO_DATA)/synth_meta.json || $(BIN)/python -m agenb.synth $(DEMO_DATA) --preset demo
	$(BIN)/python -m agenb.data check --image-dir $(DEMO_DATA)/TA/Healthy/Images --excel-path $(DEMO_DATA)/TA/characteristics.xlsx

## make bench: speed and accuracy benchmarks, results in bench/results.json
bench: $(STAMP)
	$(BIN)/python bench/run.py

## make export: regenerate agenb/ from nbs/ and clean the notebooks (run after editing a notebook)
export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
