"""Test configuration: Triton runs in its numpy interpreter on machines without a GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# The files that take longest, longest first (measured with --durations; issue 25). `make test`
# runs the suite on 2 processes, one file per process at a time (xdist --dist loadfile, without
# xdist's reordering by test count, which put these few-but-slow files last): started first, a
# long file no longer runs alone at the end while the other process idles. Every other file
# keeps its place after them; the order within a file is unchanged.
SLOW_FILES_FIRST = (
    "test_grpo_loss.py", "test_tasks.py", "test_train_loop.py", "test_docs.py", "test_config_keys.py",
    "test_grpo_loss_forms.py", "test_task_accumulate.py", "test_fuzz.py", "test_triton_compile.py",
    "test_integrations_verl.py", "test_distributed_trl.py", "test_distributed_kernels.py",
    "test_cuda_compile.py", "test_integrations_trl_rounds.py", "test_linear_logprobs.py", "test_sim.py",
)


def _file_rank(item) -> int:
    name = item.path.name
    return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: files and tests keep their order otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: no NVIDIA GPU visible to torch on this machine")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
