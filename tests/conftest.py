"""Test configuration: Triton runs in its numpy interpreter on machines without a GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: no NVIDIA GPU visible to torch on this machine")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
