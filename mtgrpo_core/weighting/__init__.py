"""Task weighting for multi-task GRPO: MT-GRPO's improvement-aware update (IWU), the
regularised reward-only ablation, uniform weights, the SEC curriculum baseline and the
per-task reward EMA. See :mod:`mtgrpo_core.weighting.task_weights`."""
from .task_weights import (ImprovementAwareWeights, RegularizedWeights, SECCurriculum, TaskRewardTracker,
                           UniformWeights)

__all__ = ["ImprovementAwareWeights", "RegularizedWeights", "UniformWeights", "SECCurriculum",
           "TaskRewardTracker"]
