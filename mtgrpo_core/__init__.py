"""mtgrpo_core: fused GRPO kernels and multi-task robustness controllers.

Ops (``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``) are re-exported here from
:mod:`mtgrpo_core.ops`; the sampler, task weighting, GDRO controllers and the training
layer live in their subpackages.
"""
from ._build import build_info
from ._version import __version__
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__all__ = ["__version__", "build_info", *_ops_all]
