"""mtgrpo_core: fused GRPO kernels and multi-task robustness controllers.

Ops (``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``) are re-exported here from
:mod:`mtgrpo_core.ops`; the sampler, task weighting, GDRO controllers and the training
layer live in their subpackages.

The re-exports are resolved on first use (PEP 562), so ``import mtgrpo_core`` (and the
``mtgrpo`` command, whose first line must appear at once) does not pay for importing torch
until an op or ``build_info`` is touched.
"""
from ._version import __version__

# the names of mtgrpo_core.ops.__all__ (a test checks that the two lists agree)
_OPS_NAMES = ("GRPOConfig", "GRPOLoss", "GRPOStats", "group_advantages", "grpo_loss",
              "LinearLogprobsConfig", "fused_linear_grpo_loss", "linear_logprobs",
              "task_masked_sum", "task_weighted_loss", "cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit")

__all__ = ["__version__", "build_info", *_OPS_NAMES]


def __getattr__(name: str):
    # the resolved object is stored in the module, so later look-ups (``mtgrpo_core.grpo_loss``
    # in a training loop) are plain attribute reads, not this function (~1 us a call)
    if name == "build_info":
        from ._build import build_info as value
    elif name in _OPS_NAMES:
        from . import ops

        value = getattr(ops, name)
    else:
        raise AttributeError(f"module 'mtgrpo_core' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
