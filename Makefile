# Mini-LLM pipeline: every user-facing command. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install test

help: ## List every target with one line each
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv and install the pinned requirements (CPU torch here; CUDA build on GPU machines)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt

test: ## Run the test suite (CPU, offline, micro models)
	$(PYTHON) -m pytest
