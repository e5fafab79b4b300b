"""GDRO controllers (difficulty-group robustness, Panaganti et al., arXiv 2601.19280): the
online pass@k difficulty classifier, Prompt-GDRO (data adversary, response reweighting) and
Rollout-GDRO (compute adversary, rollouts per prompt at an exact mean budget).

Built by name (docs/ALGORITHMS.md section 5): :func:`make_advantage_weighting` with
``"prompt-gdro"`` and :func:`make_rollout_allocation` with ``"sqrt"`` or ``"bandit"``.
"""
from functools import partial

from .classifier import DifficultyClassifier
from .prompt_gdro import PromptGDRO
from .protocol import (AdvantageWeighting, RolloutAllocation, advantage_weighting_names, make_advantage_weighting,
                       make_rollout_allocation, register_advantage_weighting, register_rollout_allocation,
                       rollout_allocation_names)
from .rollout import RolloutAllocator, weighted_standard_error

register_advantage_weighting("prompt-gdro")(PromptGDRO)
register_rollout_allocation("sqrt", factory=partial(RolloutAllocator, method="sqrt"))
register_rollout_allocation("bandit", factory=partial(RolloutAllocator, method="bandit"))

__all__ = ["DifficultyClassifier", "PromptGDRO", "RolloutAllocator", "weighted_standard_error",
           "AdvantageWeighting", "RolloutAllocation", "make_advantage_weighting", "make_rollout_allocation",
           "register_advantage_weighting", "register_rollout_allocation", "advantage_weighting_names",
           "rollout_allocation_names"]
