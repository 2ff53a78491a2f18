# The README's two commands: `make demo` and `make test`. Both run `setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
# llama-cpp-python is pinned once, in pyproject.toml; it is installed first so that its build gets both cores.
LLAMA   := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Idempotent: the stamp is rebuilt only when the project metadata changes. llama-cpp-python compiles llama.cpp
# from source once (~5 min on 2 cores); pip caches the wheel and later setups reuse it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install --quiet "$(LLAMA)"
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/kimivl-edge demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Without chromium the page tests are left out but one, tests/test_web.py::test_chromium_is_installed, which fails
# with the line that names the install command (tests/conftest.py); the note says so before the run starts.
test: setup
	@c=$${KIMIVL_EDGE_CHROMIUM:-/usr/bin/chromium}; test -x "$$c" || \
	  echo "note: $$c is missing, so one page test will fail: sudo apt-get install -y chromium"
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
