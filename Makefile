# The README's two commands, `make demo` and `make test`, set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
NBDEV_TEST_FLAGS ?=

.PHONY: install test test-all unit integration browser demo bench export readme outputs mutate

$(STAMP): requirements.lock setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

install: $(STAMP)

## make test: the notebooks' unit tests (nbdev_test), then the integration tests (pytest tests, two workers; tests
## marked slow are left out). make test-all: the same with the slow end-to-end tests too (about twice as long).
PYTEST_MARKS ?= not slow
test: unit integration

test-all:
	$(MAKE) test PYTEST_MARKS=

## The notebooks' tests write their scratch folders (tempfile.mkdtemp: data sets, runs, checkpoints) under one folder
## that is removed when they finish, pass or fail, so a make test leaves nothing in /tmp (it left about 1.3 GB).
unit: $(STAMP)
	@t=$$(mktemp -d); TMPDIR=$$t $(BIN)/nbdev_test --n_workers 2 $(NBDEV_TEST_FLAGS); rc=$$?; rm -rf "$$t"; exit $$rc

## The integration tests run with TMPDIR in a folder of their own (readable by the PostgreSQL server's user), so that
## what they and their commands leave in the temporary folder (pytest's base folder, torchrun's log folders, crash
## logs) goes with it. It is removed when the tests pass or are interrupted. When pytest fails it is kept, and make says
## where: the failed tests' tmp_path folders (pytest.ini removes the passed ones'), the shared data sets and runs of
## the session, and whatever the commands left.
PYTEST_ARGS ?= tests
PYTEST := $(BIN)/python -m pytest -c pytest.ini -q -rs -n 2 --dist loadfile --no-loadscope-reorder --durations=15
integration: $(STAMP) browser
	@t=$$(mktemp -d) || exit 1; chmod 755 "$$t"; trap 'rm -rf "$$t"; exit 130' INT TERM; \
	 echo "TMPDIR=$$t $(PYTEST) -m \"$(PYTEST_MARKS)\" $(PYTEST_ARGS)"; \
	 TMPDIR="$$t" $(PYTEST) -m "$(PYTEST_MARKS)" $(PYTEST_ARGS); rc=$$?; \
	 if [ $$rc = 0 ]; then rm -rf "$$t"; \
	 else echo "make integration: pytest exited with $$rc; its temporary folder is kept in $$t (remove it when done)"; fi; \
	 exit $$rc

## make browser: the system Chromium that tests/test_browser.py drives (through Playwright, no browser download):
## installed with apt-get when missing and this is root on a Debian-like system; otherwise one line says the browser
## test will be skipped. Never fails make.
BROWSERS := chromium chromium-browser google-chrome
BROWSER_PKG := chromium
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && { \
	   echo "make browser: $$(command -v $$b) ($$($$b --version 2>/dev/null)) for tests/test_browser.py"; exit 0; }; done; \
	 if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	   echo "make browser: no Chromium and not root with apt-get: tests/test_browser.py will be skipped"; exit 0; fi; \
	 echo "make browser: installing $(BROWSER_PKG) with apt-get"; \
	 export DEBIAN_FRONTEND=noninteractive; \
	 apt-get install -y -qq $(BROWSER_PKG) >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	   apt-get install -y -qq $(BROWSER_PKG) >/dev/null 2>&1; } || \
	   echo "make browser: apt-get install $(BROWSER_PKG) failed: tests/test_browser.py will be skipped"

## make demo: generate the synthetic demo dataset (reused only if the current generator wrote it with these
## parameters), train the mae recipe on it (nbs/train.ipynb via papermill), render the run's report.html and
## print where it is
demo: $(STAMP)
	$(BIN)/python -m agenb.synth $(DEMO_DATA) --preset demo --reuse
	$(BIN)/python -m agenb.data check --image-dir $(DEMO_DATA)/TA/Healthy/Images --excel-path $(DEMO_DATA)/TA/characteristics.xlsx
	@mkdir -p runs
	$(BIN)/papermill --engine agenb nbs/train.ipynb runs/demo_train.ipynb -k python3
	@run=$$(ls -td runs/run_*/ | head -n 1); run=$${run%/}; \
	 echo; echo "Demo run:      $$run"; \
	 echo "Test metrics:  $$($(BIN)/python -c "import json,sys; m=json.load(open('$$run/metrics.json')); print(f\"MAE {m['overall']['mae']:.2f} years (always predicting the training mean: {m['baseline']['mae']:.2f})\")")"; \
	 echo "Report:        $$run/report.html  (open it in a browser)"; \
	 echo "Notebook:      runs/demo_train.ipynb"

## make bench: speed and accuracy benchmarks, results in bench/results.json
bench: $(STAMP)
	$(BIN)/python bench/run.py

## make export: regenerate agenb/ from nbs/ and clean the notebooks (run after editing a notebook)
export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/python -c "from agenb.launch import sync_train_notebook; sync_train_notebook()"
	$(BIN)/nbdev_clean

## make outputs: re-execute chapters in place so they keep their figures and tables (slow/gpu cells skipped)
NBS ?= $(wildcard nbs/[0-9][0-9]_*.ipynb nbs/[0-9][0-9][a-z]_*.ipynb)
outputs: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py $(NBS)
	$(BIN)/nbdev_clean

## make readme: README.md is the markdown of nbs/index.ipynb
readme:
	$(PYTHON) -c "import json; nb = json.load(open('nbs/index.ipynb')); open('README.md', 'w').write('\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown') + '\n')"

## make mutate: mutation testing (mutmut, pinned in requirements.lock) of the code whose bugs would falsify results
## (split, evaluate, the trainer's decisions and checkpoints, runs, predict's preprocessing, the experiment statistics,
## protocol and OOF coverage, the age-gap statistics, the model's view pooling and heads) with the fast in-process
## tests; writes mutation/REPORT.md (counts, and every survivor with why it is equivalent). Not part of make test.
MUTATE_DIR := build/mutate
mutate: $(STAMP)
	$(BIN)/python mutation/prepare.py $(MUTATE_DIR)
	cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 MPLBACKEND=Agg $(abspath $(BIN))/mutmut run --max-children 2
	$(BIN)/python mutation/report.py $(MUTATE_DIR) mutation/REPORT.md
