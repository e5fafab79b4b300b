# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is on local disk here; an unpinned torch would pull GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0
BUILD_LOCK = $(VENV)/.build.lock

.PHONY: setup build demo test docs lint format bench info clean

$(VENV)/.torch-installed:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.deps-installed: $(VENV)/.torch-installed pyproject.toml
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
	touch $@

# Editable install without build isolation (build deps above); the native build lives in
# build/<wheel tag>, so a rebuild after a C++ change is incremental. flock serialises
# concurrent builds of the same tree.
build: $(VENV)/.deps-installed
	flock $(BUILD_LOCK) $(PIP) install -q --no-build-isolation -e ".[test]"

setup: build

demo: setup
	$(VENV)/bin/mtgrpo demo

test: setup lint
	$(PYTHON) -m pytest -q tests

# The docs site (Sphinx + MyST, API pages from the docstrings, the CLI page from the parser) into
# build/docs/html, warnings as errors. Sphinx comes with the [docs] extra, part of .[test].
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs build/docs/html
	@echo "docs: build/docs/html/index.html"

# ruff (configured in pyproject.toml) over the Python sources, tests and benchmarks, and
# clang-format (.clang-format) over csrc/; `make format` rewrites the C++ in place
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cuh' 'csrc/*.cpp' 'csrc/*.cu' 2>/dev/null || find csrc -name '*.[ch]*')
lint: setup
	$(VENV)/bin/ruff check mtgrpo_core tests bench examples
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: setup
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

bench: setup
	$(VENV)/bin/mtgrpo bench all

info: setup
	$(VENV)/bin/mtgrpo info

clean:
	rm -rf build dist *.egg-info
