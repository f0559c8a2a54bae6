# The two commands of the quick start: `make serve` and `make test`.
# Each is idempotent and does its own set-up in a local virtual environment.
# llama-cpp-python compiles from source once; pip keeps the built wheel in its
# cache, so later environments (and CI runs on the same machine) reuse it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dvai-installed
JS_STAMP := tests/js/node_modules/.package-lock.json

.PHONY: setup serve test lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	@echo "Installing dvai-mesh into $(VENV). The first time, llama-cpp-python compiles from source"
	@echo "(about 8 minutes on 2 cores, with pip's progress below); later set-ups reuse pip's cached wheel."
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

serve: setup
	$(BIN)/dvai-node serve $(ARGS)

test: setup $(JS_STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The JavaScript client tests (Vercel AI SDK) run with node from tests/js.
$(JS_STAMP): tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund

lint: setup
	$(BIN)/ruff check node rendezvous tests bench

typecheck: setup
	$(BIN)/mypy --strict node rendezvous

bench: setup
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache tests/js/node_modules
