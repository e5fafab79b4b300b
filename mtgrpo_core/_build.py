"""``build_info()``: what this installation can run."""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import _native
from ._version import __version__


def build_info() -> dict:
    """Describe the build and the machine.

    Returns
    -------
    dict
        ``version``, ``cxx_extension`` (the C++ module imports), ``cuda_kernels_compiled``
        (nvcc built the CUDA kernels into it), ``cuda_available`` (a GPU is visible to
        torch), ``triton_available`` (triton imports), ``triton_interpret`` (kernels run in
        the numpy interpreter), ``openmp``, ``omp_threads``, ``compiler``, ``cuda_archs``,
        ``torch``, ``python``, ``platform``.
    """
    info = {
        "version": __version__,
        "cxx_extension": _native.available(),
        "cuda_kernels_compiled": False,
        "cuda_available": bool(torch.cuda.is_available()),
        "triton_available": importlib.util.find_spec("triton") is not None,
        "triton_interpret": _triton_interpret(),
        "openmp": False,
        "omp_threads": 1,
        "compiler": "",
        "cuda_archs": "",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if info["cxx_extension"]:
        mod = _native.native()
        info.update({k: v for k, v in dict(mod.BUILD_INFO).items() if k != "version"})
        info["omp_threads"] = int(mod.num_threads())
    return info


def _triton_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
