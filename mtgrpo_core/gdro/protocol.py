"""The GDRO controller protocols and their registries (docs/ALGORITHMS.md section 5).

Two kinds of controller act on difficulty groups (the bins of
:class:`~mtgrpo_core.gdro.DifficultyClassifier`):

:class:`AdvantageWeighting` (Prompt-GDRO, the data adversary)
    ``response_weights(groups[N])`` -> float64[N] multipliers of each response's advantage
    (mean 1 over the batch), or None for "no reweighting"; ``observe(groups[N],
    per_response_loss[N])`` folds one step's losses in. The loss passed is the UNWEIGHTED
    per-response clipped surrogate (never one already multiplied by these weights). A
    weighting whose ``needs_rewards`` is True is also given ``rewards=`` [N] and
    ``prompt_of=`` [N] (prompt index of each response) as keywords.
:class:`RolloutAllocation` (Rollout-GDRO, the compute adversary)
    ``allocate(groups_of_prompts[P])`` -> int64[P] rollouts per prompt (called before
    generation); ``observe(groups_of_prompts[P], n[P], rewards_per_prompt)`` folds the
    realised rewards in.

Both have ``num_groups``, ``metrics()`` (per-step diagnostics to log), ``state_dict()`` and
``load_state_dict(d)``. Registered by name (:func:`make_advantage_weighting`,
:func:`make_rollout_allocation`); the trainer, the simulator and the integrations use
these names only.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._registry import Registry

__all__ = ["AdvantageWeighting", "RolloutAllocation", "register_advantage_weighting", "make_advantage_weighting",
           "advantage_weighting_names", "register_rollout_allocation", "make_rollout_allocation",
           "rollout_allocation_names"]


@runtime_checkable
class AdvantageWeighting(Protocol):
    """Reweights advantages by difficulty group (see the module docstring)."""

    num_groups: int

    def response_weights(self, groups: Any) -> np.ndarray | None: ...

    def observe(self, groups: Any, per_response_loss: Any) -> np.ndarray: ...

    def metrics(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


@runtime_checkable
class RolloutAllocation(Protocol):
    """Chooses rollouts per prompt by difficulty group (see the module docstring)."""

    num_groups: int

    def allocate(self, groups_of_prompts: Any) -> np.ndarray: ...

    def observe(self, groups_of_prompts: Any, n: Any, rewards_per_prompt: Any) -> None: ...

    def metrics(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


_ADV = Registry("advantage weighting", ("response_weights", "observe", "metrics", "state_dict", "load_state_dict"))
_ALLOC = Registry("rollout allocation", ())


def register_advantage_weighting(name: str, *aliases: str):
    """Class decorator: register an :class:`AdvantageWeighting` built as ``cls(num_groups, **kw)``."""
    return _ADV.register(name, *aliases)


def make_advantage_weighting(name: str, num_groups: int, **kwargs: Any) -> AdvantageWeighting:
    """Build the advantage weighting ``name`` (e.g. ``"prompt-gdro"``) over ``num_groups`` groups."""
    return _ADV.make(name, num_groups, **kwargs)


def advantage_weighting_names(*, aliases: bool = False) -> tuple[str, ...]:
    return _ADV.names(aliases=aliases)


def register_rollout_allocation(name: str, *aliases: str, factory=None):
    """Register a :class:`RolloutAllocation` factory ``f(num_groups, **kw)`` (or decorate a class)."""
    return _ALLOC.register(name, *aliases, factory=factory)


def make_rollout_allocation(name: str, num_groups: int, **kwargs: Any) -> RolloutAllocation:
    """Build the rollout allocation ``name`` (``"sqrt"`` or ``"bandit"``) over ``num_groups`` groups."""
    return _ALLOC.make(name, num_groups, **kwargs)


def rollout_allocation_names(*, aliases: bool = False) -> tuple[str, ...]:
    return _ALLOC.names(aliases=aliases)
