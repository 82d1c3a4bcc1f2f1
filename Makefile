# paperlab: the two commands of the README, and a few helpers.
#   make book   install into .venv, run every chapter in full mode, write results/ and the docs site _docs/
#   make test   install into .venv if needed, run every notebook in quick mode (nbdev_test) and pytest tests/
#   make lab    JupyterLab on nbs/ with the project's environment as its kernel
#   make verify the book as its users meet it: every chapter run in quick mode into $(QUICK), its ledgers checked
#               against their executed notebooks (paperlab ledger --check), rerun under nbval
#               and compared output by output, the docs site built from those runs, and browser tests of the
#               site and of JupyterLab (Playwright with the system Chromium; .ci/run installs it)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.paperlab-installed
# torch and torchvision go in first, as the pinned pair named in settings.ini (the one place versions are pinned)
TORCH_PINS := $(shell sed -n 's/^torch_pins *= *//p' settings.ini)
# mamba-ssm: built from source after torch, without build isolation and without its CUDA kernels (see settings.ini)
MAMBA_BUILD := $(shell sed -n 's/^mamba_build *= *//p' settings.ini)
MAMBA_PINS := $(shell sed -n 's/^mamba_pins *= *//p' settings.ini)
# where `make verify` keeps its quick-mode runs and their docs site (never results/, which holds the book's full runs)
QUICK ?= _build/quick
# pytest exits with 5 when it collected no tests: say so instead of failing
PYTEST_OK_IF_EMPTY := rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

.PHONY: book test lint install export clean-nbs readme docs reproduce-quick clean lab kernel verify quick-runs nbval browser

$(STAMP): settings.ini setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q $(MAMBA_BUILD)
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install -q --no-build-isolation $(MAMBA_PINS)
	@touch $@

install: $(STAMP)

# the exported package must stand without its notebooks: undefined, unused and redefined names fail the build
lint: install
	$(PY) -m ruff check --select F821,F811,F401 --exclude _modidx.py paperlab

test: install lint
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  OMP_NUM_THREADS=1 PAPERLAB_MODE=quick PAPERLAB_RESULTS="$$tmp" $(BIN)/nbdev_test --n_workers 2 --timing && \
	  PAPERLAB_MODE=quick PAPERLAB_RESULTS="$$tmp" $(PY) -m pytest -q tests --ignore=tests/test_browser.py; \
	  $(PYTEST_OK_IF_EMPTY)

# two chapters at a time ($(JOBS), one thread each), the index last; their timed sections take turns under the timing
# lock of results/ (paperlab.ledger.timing_lock), so no speed ratio is measured while the other chapter computes.
# `paperlab times` prints each chapter's wall and CPU time beside its budget (6 min in full mode; tests/test_budgets.py)
book: install
	$(PY) -c "from paperlab.cli import chapters; print('\n'.join(c for c in chapters() if c != 'index'))" | \
	  OMP_NUM_THREADS=1 xargs -P $(JOBS) -I{} $(BIN)/paperlab reproduce {} --mode full
	OMP_NUM_THREADS=1 $(BIN)/paperlab reproduce index --mode full
	$(BIN)/paperlab times
	$(BIN)/paperlab docs build --out _docs
	$(BIN)/paperlab docs readme

# the kernel "python3" of JupyterLab is this environment's Python: registered inside the venv (--sys-prefix) with its
# absolute path, so it holds whichever jupyter finds it; ROOT=1 adds --allow-root (needed when running as root)
# lab/overrides.json: JupyterLab's settings for the book (no news popup, the kernel started without asking)
# lab/custom/: custom.css and the font that draws ⏱; JupyterLab serves custom/ from its config dir, the venv's etc/jupyter
# for `make lab` (with --LabApp.custom_css=True); a reader's own Lab settings and workspaces stay where they were
kernel: install
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (paperlab)" >/dev/null
	@mkdir -p $(VENV)/share/jupyter/lab/settings && cp lab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	@mkdir -p $(VENV)/etc/jupyter/custom && cp lab/custom/* $(VENV)/etc/jupyter/custom/

LAB_ARGS ?=
LAB_ROOT ?= nbs
LAB_CONFIG := $(abspath $(VENV))/etc/jupyter
lab: kernel
	PATH="$(abspath $(BIN)):$$PATH" \
	  JUPYTERLAB_SETTINGS_DIR="$${JUPYTERLAB_SETTINGS_DIR:-$${JUPYTER_CONFIG_DIR:-$$HOME/.jupyter}/lab/user-settings}" \
	  JUPYTERLAB_WORKSPACES_DIR="$${JUPYTERLAB_WORKSPACES_DIR:-$${JUPYTER_CONFIG_DIR:-$$HOME/.jupyter}/lab/workspaces}" \
	  JUPYTER_CONFIG_DIR="$(LAB_CONFIG)" $(BIN)/jupyter lab --ServerApp.root_dir=$(LAB_ROOT) --ServerApp.default_url=/lab/tree/index.ipynb --LabApp.custom_css=True \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# every chapter in quick mode into $(QUICK), then nbval reruns them, then the site and the browser tests. Chapters run
# on one thread each, $(JOBS) at a time (each is its own `paperlab reproduce`), the index last (it reads their ledgers).
JOBS ?= 2
verify: install kernel
	$(MAKE) --no-print-directory quick-runs
	$(BIN)/paperlab --results $(abspath $(QUICK)) ledger --check
	$(MAKE) --no-print-directory nbval
	PAPERLAB_RESULTS=$(QUICK) $(BIN)/paperlab docs build --out $(QUICK)/_docs
	$(MAKE) --no-print-directory browser

quick-runs: install kernel
	@mkdir -p $(QUICK) && rm -f $(QUICK)/*.failed.ipynb
	$(PY) -c "from paperlab.cli import chapters; print('\n'.join(c for c in chapters() if c != 'index'))" | \
	  OMP_NUM_THREADS=1 xargs -P $(JOBS) -I{} $(BIN)/paperlab --results $(abspath $(QUICK)) reproduce {} --mode quick
	OMP_NUM_THREADS=1 $(BIN)/paperlab --results $(abspath $(QUICK)) reproduce index --mode quick

# rerun each executed quick-mode notebook of $(QUICK) and compare it with the stored run, output by output; times, paths
# and addresses go through tests/nbval_sanitize.cfg; outputs an ipywidgets Output widget captures stay in the widget
# (tests/nbval_widgets.py, as in JupyterLab). Reruns write into a scratch folder, never over the stored runs.
# One pytest per notebook, $(JOBS) at a time; each notebook's report goes to $(QUICK)/nbval/ and is printed if it fails.
NBVAL_NBS = $(filter-out $(QUICK)/_docs/%,$(wildcard $(QUICK)/*/*.ipynb))
NBVAL_ENV = OMP_NUM_THREADS=1 PAPERLAB_MODE=quick PAPERLAB_LEDGERS="$(abspath $(QUICK))" \
  MPLBACKEND=module://matplotlib_inline.backend_inline PYTHONPATH="$(abspath tests)"
NBVAL_PYTEST = $(abspath $(PY)) -m pytest -q -p no:cacheprovider -p nbval_widgets --rootdir "$(abspath $(QUICK))" \
  --nbval --nbval-current-env --nbval-cell-timeout 600 --nbval-sanitize-with "$(abspath tests/nbval_sanitize.cfg)"
nbval: kernel
	@test -n "$(NBVAL_NBS)" || { echo "no executed notebooks in $(QUICK)/: run make verify (or make quick-runs)"; exit 1; }
	@rm -rf $(QUICK)/nbval && mkdir -p $(QUICK)/nbval && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  printf '%s\n' $(NBVAL_NBS) | $(NBVAL_ENV) PAPERLAB_RESULTS="$$tmp" xargs -P $(JOBS) -I{} sh -c \
	    'log=$(abspath $(QUICK))/nbval/$$(basename {} .ipynb).log; if $(NBVAL_PYTEST) {} > $$log 2>&1; \
	     then echo "nbval: $$(tail -n 1 $$log) in {}"; else cat $$log; echo "nbval: FAILED {}"; exit 1; fi'

# the docs site of $(QUICK)/_docs and JupyterLab in headless Chromium
browser: install
	PAPERLAB_DOCS="$(abspath $(QUICK))/_docs" PAPERLAB_RESULTS="$(abspath $(QUICK))" $(PY) -m pytest -q -rs tests/test_browser.py; \
	  $(PYTEST_OK_IF_EMPTY)

# README.md is generated from nbs/index.ipynb (its executed copy in results/index/ when there is one)
readme: install
	$(BIN)/paperlab docs readme

docs: install
	$(BIN)/paperlab docs build --out _docs

reproduce-quick: install
	$(BIN)/paperlab reproduce --all --mode quick

# after editing notebooks: export the package and clean the notebooks
export: install
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

clean:
	rm -rf _docs _build results
