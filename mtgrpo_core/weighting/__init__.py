"""Task weighting for multi-task GRPO: MT-GRPO's improvement-aware update (IWU), the
regularised reward-only ablation (Subroutine 2), uniform weights, the SEC curriculum baseline
and the per-task reward EMA.

Every controller follows :class:`~mtgrpo_core.weighting.protocol.TaskWeighting` and is built
by name with :func:`make_weighting`; the registered names (aliases in brackets) are
``"uniform"``, ``"iwu"`` (``"mtgrpo"``, ``"improvement-aware"``), ``"reward-only"``
(``"regularized"``) and ``"sec"``. See docs/ALGORITHMS.md sections 3-4.
"""
from .protocol import (WEIGHTINGS, TaskStats, TaskWeighting, canonical_weighting, make_weighting, register_weighting,
                       weighting_names)
from .task_weights import ImprovementAwareWeights, RegularizedWeights, SECCurriculum, TaskRewardTracker, UniformWeights

register_weighting("uniform")(UniformWeights)
register_weighting("iwu", "mtgrpo", "improvement-aware")(ImprovementAwareWeights)
register_weighting("reward-only", "regularized")(RegularizedWeights)
register_weighting("sec")(SECCurriculum)

__all__ = ["ImprovementAwareWeights", "RegularizedWeights", "UniformWeights", "SECCurriculum",
           "TaskRewardTracker", "TaskStats", "TaskWeighting", "register_weighting", "make_weighting",
           "weighting_names", "canonical_weighting", "WEIGHTINGS"]
