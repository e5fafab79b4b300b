"""GDRO controllers (difficulty-group robustness, Panaganti et al., arXiv 2601.19280): the
online pass@k difficulty classifier, Prompt-GDRO (data adversary, response reweighting) and
Rollout-GDRO (compute adversary, rollouts per prompt at an exact mean budget)."""
from .classifier import DifficultyClassifier
from .prompt_gdro import PromptGDRO
from .rollout import RolloutAllocator, weighted_standard_error

__all__ = ["DifficultyClassifier", "PromptGDRO", "RolloutAllocator", "weighted_standard_error"]
