"""Public ops. Each module: reference -> kernels -> one torch.library custom op (fake + autograd) -> public
function; the backend is picked in :mod:`._dispatch` (see docs/OPS.md)."""

from ..config import GRPOConfig
from ._cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from .grpo_loss import GRPOLoss, GRPOStats, group_advantages, grpo_loss
from .linear_logprobs import LinearLogprobsConfig, fused_linear_grpo_loss, linear_logprobs
from .task_accumulate import task_masked_sum, task_weighted_loss

__all__: list[str] = ["GRPOConfig", "GRPOLoss", "GRPOStats", "group_advantages", "grpo_loss",
                      "LinearLogprobsConfig", "fused_linear_grpo_loss", "linear_logprobs",
                      "task_masked_sum", "task_weighted_loss", "cpu_cache_info", "empty_cpu_cache",
                      "set_cpu_cache_limit"]
