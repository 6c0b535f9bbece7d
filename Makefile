# Two commands a newcomer needs:  make repro  (set up + run the study)  and  make test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# BoTorch compiles a small C++ kernel for qLogNEHVI on first use (about 40 s of one core): keep it with
# this venv, so that two checkouts with their own venvs do not rebuild each other's copy. The set-up builds
# it as soon as torch, ninja and BoTorch's source are unpacked, with BoTorch's own arguments, while the
# other packages are still being installed; BoTorch's first load then finds the build up to date.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
KERNEL_BUILD := import importlib.util, pathlib; from torch.utils.cpp_extension import load; \
	src = pathlib.Path(importlib.util.find_spec("botorch").origin).parent / "csrc" / "logei_fused.cpp"; \
	load(name="logei_fused_ext", sources=[str(src)], extra_cflags=["-O3", "-march=native"], verbose=False)
KERNEL := from botorch.acquisition.multi_objective.logei import _try_load_fused_kernel; _try_load_fused_kernel()
# pip would byte-compile all ~22,500 files it installs (about 95 s on 2 cores), most of which the study
# never imports. The venv is installed without bytecode; the set-up then imports what the study runs
# (about 5,100 modules), which writes their bytecode, and anything else is written on first import.
# PYTHONDONTWRITEBYTECODE would make every process compile those modules again in memory, so the
# commands make runs go without it.
unexport PYTHONDONTWRITEBYTECODE
TOOLS := import dvc.cli, dvc.repo, ipykernel.kernelapp, nbval.plugin, papermill, pytest, \
	matplotlib.pyplot, pandas, seaborn, scipy.stats, onnx, onnxruntime, pymoo.algorithms.moo.nsga2
WARM := import importlib, pkgutil, nanosd_lib; \
	[importlib.import_module("nanosd_lib." + m.name) for m in pkgutil.iter_modules(nanosd_lib.__path__)]; \
	import torch.distributed.run

.PHONY: setup lock repro test unit nbval check-reports clean-nbval refresh-notebooks

# pip unpacks wheels on one core, and the torch build here brings about 6 GB of files: 3.2 GB of NVIDIA's
# CUDA libraries and 1.2 GB of torch itself. `make setup` runs the steps below as a graph on two jobs,
# whatever -j was given. requirements.lock (every distribution, pinned) is installed without resolving, in
# three pip processes: the CUDA libraries; torch with what it imports (numpy included: torch imports it when
# it finds it, and a half-installed numpy fails the kernel's build), ninja and BoTorch (BoTorch's kernel
# is then built from these while the rest is still being installed); and the other ~240 distributions.
# Next, the tools make runs and the study's own imports write their bytecode, in two processes.
# Then the plain install of requirements.txt finds everything in place (it installs whatever a stale lock
# missed, and the setuptools that this package's editable install needs), and `pip check` confirms that
# no dependency is missing. The venv is rebuilt only when the pins or the package metadata change.
setup:
	@$(MAKE) --no-print-directory -j2 SETUP_GRAPH=1 $(STAMP)

# Two torch processes on two cores slow each other down many times over: apart from the set-up graph,
# this makefile runs one step at a time whatever -j was given.
ifndef SETUP_GRAPH
.NOTPARALLEL:
endif

HEAVY := ^(torch|nvidia-.*|cuda-.*|filelock|typing_extensions|sympy|mpmath|networkx|Jinja2|MarkupSafe|fsspec|numpy|ninja|botorch)==
CUDA := ^nvidia-
LOCKED := $(BIN)/pip install --quiet --no-compile --no-deps --no-warn-conflicts

$(VENV)/.created: requirements.txt requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	grep -E '$(CUDA)' requirements.lock > $(VENV)/lock-cuda.txt
	grep -E '$(HEAVY)' requirements.lock | grep -vE '$(CUDA)' > $(VENV)/lock-torch.txt
	grep -vE '$(HEAVY)|^#' requirements.lock > $(VENV)/lock-rest.txt
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(LOCKED) -r $(VENV)/lock-cuda.txt & $(LOCKED) -r $(VENV)/lock-torch.txt && wait $$!
	touch $@

$(VENV)/.kernel: $(VENV)/.torch
	$(BIN)/python -c '$(KERNEL_BUILD)'
	touch $@

$(VENV)/.rest: $(VENV)/.created
	$(LOCKED) -r $(VENV)/lock-rest.txt
	touch $@

$(VENV)/.tools: $(VENV)/.rest
	$(BIN)/python -c '$(TOOLS)'
	touch $@

# Run in the repository, so nanosd_lib imports from the working tree before its editable install.
$(VENV)/.warm: $(VENV)/.torch $(VENV)/.rest
	$(BIN)/python -c '$(WARM)'
	touch $@

# The plain install may upgrade setuptools, which the kernel's build imports: it waits for the build.
$(STAMP): $(VENV)/.kernel $(VENV)/.tools $(VENV)/.warm
	$(BIN)/pip install --quiet --no-compile -r requirements.txt
	$(BIN)/pip install --quiet --no-compile --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	$(BIN)/python -c '$(KERNEL)'
	touch $@

repro: setup
	$(BIN)/python -m nanosd_lib.run --check
	$(BIN)/dvc repro

test: setup unit nbval

unit: setup
	$(BIN)/python -m pytest -q --durations=15 tests

# After changing requirements.txt: resolve it in a scratch venv and write every version to requirements.lock.
lock:
	rm -rf build/lock && $(PYTHON) -m venv build/lock
	build/lock/bin/pip install --quiet --no-compile -r requirements.txt
	{ echo "# Every distribution the set-up installs, at the version pip resolved from requirements.txt (Python 3.11,"; \
	  echo "# x86_64). Written by \`make lock\`; rewrite it after changing requirements.txt."; \
	  build/lock/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf build/lock

# Every notebook at the smoke scale, in stage order; outputs go to build/nbval, never to DVC outputs.
# The notebooks share one kernel, emptied before each of them (tests/nbval_one_kernel.py says how): each
# would otherwise spend several seconds importing torch, diffusers and the plotting stack again.
nbval: setup clean-nbval
	$(BIN)/python -m pytest -q --nbval-lax -p no:cacheprovider -p tests.nbval_one_kernel --durations=0 notebooks

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
