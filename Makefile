# Every target bootstraps .venv itself; the llama-server build is cached under ~/.cache/runnerd.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv engine model

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

engine: venv
	$(BIN)/runnerd install-backend llama.cpp

model: venv
	@$(BIN)/python scripts/gemma_model.py

run: engine
	$(BIN)/runnerd serve --model gemma3=$$($(BIN)/python scripts/gemma_model.py) --print-chat-command

test: engine
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check runnerd backends tests bench scripts
	$(BIN)/mypy runnerd backends

bench: engine
	$(BIN)/python bench/proxy.py
