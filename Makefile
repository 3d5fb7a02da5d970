# `make quickstart` and `make test` each work on a fresh machine: they create .venv and install what
# they need. Where no NVIDIA GPU is present the CPU build of torch is installed (an unpinned torch
# would pull a multi-GB CUDA build); the package itself accepts a range of torch versions.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast test-gpu bench bench-gpu clean cluster-up cluster-down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# Pin the torch now installed so that no later requirement swaps it for another build.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	# DeepSpeed's setup imports torch: build it against the torch above, without compiling ops.
	PIP_CONSTRAINT=$(VENV)/constraints.txt DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

quickstart: install
	$(VENV)/bin/slimtrain quickstart

test: install cluster-up
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS) tests

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS) tests

bench: install
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/step.py --plain

# The GPU figures of docs/benchmarks.md, in one go on one GPU (about 25 minutes on an H100).
bench-gpu: install
	$(PY) benchmarks/step.py --accum 8
	$(PY) benchmarks/step.py --compile --accum 8 --profile
	$(PY) benchmarks/step.py --compile --loss-chunk 4096 --accum 8
	$(PY) benchmarks/step.py --compile --loss-chunk 4096 --accum 8 --doc-len 1024 --attention flex
	$(PY) benchmarks/step.py --compile --loss-chunk 4096 --accum 8 --doc-len 1024 --attention varlen
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/loss.py --tokens 8192 --vocab 128256
	$(PY) benchmarks/megatron_step.py --accum 8
	$(PY) benchmarks/memory.py recipes/llama-1b-dense.yaml
	$(PY) benchmarks/memory.py recipes/llama-1b-dense.yaml train.activation_checkpointing=true train.loss_chunk_tokens=4096
	$(PY) benchmarks/qat.py --kernels --overhead --micro-batch 16
	$(PY) benchmarks/qat.py --overhead --compile --micro-batch 16
	$(PY) benchmarks/qat.py --steps 2000 --global-batch 64 --qat-start 1500 1900

# Needs root (apt, daemons). Without it the SLURM tests skip, except under CI where they must run.
cluster-up:
	@bash slurm/local-cluster.sh up || [ -z "$$CI" ]

cluster-down:
	@bash slurm/local-cluster.sh down

clean:
	rm -rf $(VENV) runs .pytest_cache
