"""The task-weighting controller protocol and its registry.

A task-weighting controller holds task weights ``z`` (K numbers on the simplex) that decide
how much of each batch a task gets (docs/ALGORITHMS.md section 3). Everything that drives
one (the trainer, the simulator, the TRL and verl samplers, the CLI) talks to it through
:class:`TaskWeighting` only and builds it by name through :func:`make_weighting`, so adding
a rule is one class with :func:`register_weighting` and nothing else.

Protocol (what the callers rely on)
-----------------------------------
``weights``
    float64[K], non-negative, sums to 1: the shares of the next batch.
``needs_improvement``
    True when ``observe`` uses ``TaskStats.improvements`` (MT-GRPO's I_k, which costs one
    extra forward pass per optimiser mini-batch). The trainer then measures I_k and calls
    ``observe`` after every mini-batch; otherwise it calls ``observe`` once per step, after
    the policy update.
``observe(stats)``
    Fold one update's per-task statistics (:class:`TaskStats`) in; returns the new weights.
``metrics()``
    Extra per-step diagnostics to log (a dict of JSON-able values; may be empty).
``state_dict()`` / ``load_state_dict(d)``
    JSON-able state that restores the controller bit-exactly (exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._registry import Registry
from ._common import as_mask, as_vector

__all__ = ["TaskStats", "TaskWeighting", "register_weighting", "make_weighting", "weighting_names",
           "WEIGHTINGS", "canonical_weighting"]


@dataclass(frozen=True)
class TaskStats:
    """One update's per-task statistics (all arrays of length K).

    Attributes
    ----------
    rewards : float[K]
        J_k, the per-task accuracy (the trainer passes its EMA over generation rounds).
    present : bool[K]
        Tasks with at least one response in the update; controllers leave the others alone.
    improvements : float[K] or None
        I_k = -(sum of task k's per-response losses after the optimiser step - before), on
        the same samples; None when the caller did not measure it.
    mean_abs_advantage : float[K] or None
        Mean |advantage| of each task's responses (SEC's learnability signal).
    """

    rewards: np.ndarray
    present: np.ndarray
    improvements: np.ndarray | None = None
    mean_abs_advantage: np.ndarray | None = None

    @classmethod
    def make(cls, num_tasks: int, rewards: Any, present: Any = None, improvements: Any = None,
             mean_abs_advantage: Any = None) -> TaskStats:
        """Validated constructor: arrays of length ``num_tasks``, finite values.

        ``present`` defaults to all tasks.
        """
        r = as_vector("rewards", rewards, num_tasks)
        p = np.ones(num_tasks, bool) if present is None else as_mask("present", present, num_tasks)
        i = as_vector("improvements", improvements, num_tasks, allow_none=True)
        m = as_vector("mean_abs_advantage", mean_abs_advantage, num_tasks, allow_none=True)
        return cls(r, p, i, m)


@runtime_checkable
class TaskWeighting(Protocol):
    """What every task-weighting controller provides (see the module docstring)."""

    num_tasks: int
    needs_improvement: bool

    @property
    def weights(self) -> np.ndarray: ...

    def observe(self, stats: TaskStats) -> np.ndarray: ...

    def metrics(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


_REGISTRY = Registry("task weighting", ("weights", "observe", "metrics", "state_dict", "load_state_dict",
                                        "needs_improvement"))
WEIGHTINGS = _REGISTRY.factories


def register_weighting(name: str, *aliases: str):
    """Class decorator: register a :class:`TaskWeighting` under ``name`` (and ``aliases``).

    The class is built as ``cls(num_tasks, **kwargs)``; see CONTRIBUTING.md for an example.
    """
    return _REGISTRY.register(name, *aliases)


def weighting_names(*, aliases: bool = False) -> tuple[str, ...]:
    """Registered names (canonical first; with ``aliases=True`` also the aliases)."""
    return _REGISTRY.names(aliases=aliases)


def canonical_weighting(name: str) -> str:
    """The canonical registry name of ``name`` (a name or an alias); ValueError if unknown."""
    return _REGISTRY.canonical(name)


def make_weighting(name: str, num_tasks: int, **kwargs: Any) -> TaskWeighting:
    """Build the registered task weighting ``name`` for ``num_tasks`` tasks.

    Parameters
    ----------
    name : str
        A registered name or alias (:func:`weighting_names`).
    num_tasks : int
        K >= 1.
    **kwargs
        The class's hyperparameters (e.g. ``lam=0.25`` for ``"iwu"``); an unknown keyword
        raises TypeError naming it.
    """
    return _REGISTRY.make(name, num_tasks, **kwargs)
