# Two commands a newcomer needs:  make repro  (set up + run the study)  and  make test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# BoTorch compiles a small C++ kernel for qLogNEHVI on first use (about 25 s on one core): keep it with
# this venv, so that two checkouts with their own venvs do not rebuild each other's copy. The set-up
# builds it on one core while the other writes bytecode (below), so neither waits for the other.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
KERNEL := from botorch.acquisition.multi_objective.logei import _try_load_fused_kernel; _try_load_fused_kernel()
# pip would byte-compile all ~22,500 files it installs (about 95 s on 2 cores), most of which the study
# never imports. The venv is installed without bytecode; the set-up then imports what the study runs
# (about 5,100 modules, 27 s), which writes their bytecode, and anything else is written on first import.
# PYTHONDONTWRITEBYTECODE would make every process compile those modules again in memory, so the
# commands make runs go without it.
unexport PYTHONDONTWRITEBYTECODE
WARM := import importlib, pkgutil, nanosd_lib; \
	[importlib.import_module("nanosd_lib." + m.name) for m in pkgutil.iter_modules(nanosd_lib.__path__)]; \
	import dvc.cli, dvc.repo, ipykernel.kernelapp, nbval.plugin, papermill, pytest, torch.distributed.run

.PHONY: setup repro test unit nbval check-reports clean-nbval refresh-notebooks

setup: $(STAMP)

# The venv is rebuilt only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -r requirements.txt
	$(BIN)/pip install --quiet --no-compile --no-deps --no-build-isolation -e .
	$(BIN)/python -c '$(KERNEL)' & $(BIN)/python -c '$(WARM)' && wait $$!
	touch $@

repro: setup
	$(BIN)/python -m nanosd_lib.run --check
	$(BIN)/dvc repro

test: setup unit nbval

unit:
	$(BIN)/python -m pytest -q --durations=15 tests

# Every notebook at the smoke scale, in stage order; outputs go to build/nbval, never to DVC outputs.
nbval: clean-nbval
	$(BIN)/python -m pytest -q --nbval-lax -p no:cacheprovider --durations=0 notebooks

clean-nbval:
	rm -rf build/nbval

# Re-execute the committed reports (default scale) in a scratch copy and compare marked outputs.
check-reports: setup
	rm -rf build/check-reports && mkdir -p build/check-reports
	git archive HEAD | tar -x -C build/check-reports
	cd build/check-reports && $(CURDIR)/$(BIN)/python -m pytest -q --nbval-lax -p no:cacheprovider reports

# After editing a notebook: re-execute it in place at its smoke defaults, so that the outputs nbval
# compares (cells marked NBVAL_CHECK_OUTPUT) are current.
refresh-notebooks: setup clean-nbval
	cd notebooks && for nb in [0-9][0-9]_*.ipynb; do \
	  $(CURDIR)/$(BIN)/jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; done
