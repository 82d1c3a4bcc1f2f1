# paperlab: the two commands of the README, and a few helpers.
#   make book   install into .venv, run every chapter in full mode, write results/ and the docs site _docs/
#   make test   install into .venv if needed, run every notebook in quick mode (nbdev_test) and pytest tests/
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.paperlab-installed
# torch and torchvision go in first, as the pinned pair named in settings.ini (the one place versions are pinned)
TORCH_PINS := $(shell sed -n 's/^torch_pins *= *//p' settings.ini)

.PHONY: book test lint install export clean-nbs readme docs reproduce-quick clean

$(STAMP): settings.ini setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(STAMP)

# the exported package must stand without its notebooks: undefined, unused and redefined names fail the build
lint: install
	$(PY) -m ruff check --select F821,F811,F401 --exclude _modidx.py paperlab

test: install lint
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  OMP_NUM_THREADS=1 PAPERLAB_MODE=quick PAPERLAB_RESULTS="$$tmp" $(BIN)/nbdev_test --n_workers 2 --timing && \
	  PAPERLAB_MODE=quick PAPERLAB_RESULTS="$$tmp" $(PY) -m pytest -q tests

book: install
	$(BIN)/paperlab reproduce --all --mode full
	$(BIN)/paperlab docs build --out _docs
	$(BIN)/paperlab docs readme

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
