"""Public ops. Each module: Triton kernels + launchers + autograd.Function + public function."""

from ..config import GRPOConfig
from .grpo_loss import GRPOLoss, GRPOLossFunction, GRPOStats, group_advantages, grpo_loss
from .linear_logprobs import LinearLogprobsConfig, fused_linear_grpo_loss, linear_logprobs
from .task_accumulate import TaskWeightedLossFunction, task_masked_sum, task_weighted_loss

__all__: list[str] = ["GRPOConfig", "GRPOLoss", "GRPOLossFunction", "GRPOStats", "group_advantages", "grpo_loss",
            "LinearLogprobsConfig", "fused_linear_grpo_loss", "linear_logprobs",
            "TaskWeightedLossFunction", "task_masked_sum", "task_weighted_loss"]
