"""Algorithms as data: every training method is a bundle of five choices.

The trainer (:mod:`mtgrpo_core.train.trainer`), the simulator (:mod:`mtgrpo_core.sim`) and
the CLI read these bundles; none of them branches on an algorithm's name. A bundle says

``sampler``
    ``"ratio-preserving"``: MT-GRPO's RP sampler (targets ``n_k`` from the task weights,
    acceptance-aware resampling rounds; docs/ALGORITHMS.md section 3.3), or ``"mixed"``: each
    prompt's task drawn with probabilities ``z`` (one walker per task pool).
``filter_zero_adv``
    Drop prompts whose group has zero advantage and redraw (DAPO's dynamic sampling).
``weighting``
    A task-weighting name of :func:`mtgrpo_core.weighting.make_weighting`.
``advantage_weighting``
    None or a name of :func:`mtgrpo_core.gdro.make_advantage_weighting` (Prompt-GDRO).
``rollout_allocation``
    None (``rl.group_size`` completions per prompt) or a name of
    :func:`mtgrpo_core.gdro.make_rollout_allocation`; the trainer takes the rule from
    ``gdro.allocator`` (default ``"sqrt"``).
``loss``
    The loss settings the method implies (clip range, aggregation), used where the
    config leaves ``loss.*`` unset.

Adding an algorithm is one :func:`register_algorithm` call (see CONTRIBUTING.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ._registry import Registry

__all__ = ["Algorithm", "register_algorithm", "get_algorithm", "algorithm_names", "ALGORITHMS"]

SAMPLERS = ("ratio-preserving", "mixed")

# DAPO's loss: clip-higher (eps_high 0.28) and token-mean aggregation (both papers' setting).
_DAPO_LOSS = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "loss_agg": "token-mean"}
# The original GRPO loss: symmetric PPO clip and a mean over sequences of token means.
_GRPO_LOSS = {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "loss_agg": "seq-mean-token-mean"}


@dataclass(frozen=True)
class Algorithm:
    """One training method (see the module docstring for the fields)."""

    name: str
    description: str
    sampler: str = "mixed"
    filter_zero_adv: bool = False
    weighting: str = "uniform"
    advantage_weighting: str | None = None
    rollout_allocation: str | None = None
    loss: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {self.sampler!r}")
        from .gdro.protocol import advantage_weighting_names, rollout_allocation_names
        from .weighting.protocol import canonical_weighting

        canonical_weighting(self.weighting)   # raises on an unknown name
        if self.advantage_weighting is not None and self.advantage_weighting not in advantage_weighting_names(
                aliases=True):
            raise ValueError(f"advantage_weighting: expected one of {advantage_weighting_names()} or None, "
                             f"got {self.advantage_weighting!r}")
        if self.rollout_allocation is not None and self.rollout_allocation not in rollout_allocation_names(
                aliases=True):
            raise ValueError(f"rollout_allocation: expected one of {rollout_allocation_names()} or None, "
                             f"got {self.rollout_allocation!r}")

    @property
    def uses_difficulty_bins(self) -> bool:
        """True when a GDRO controller needs the difficulty classifier's bins."""
        return self.advantage_weighting is not None or self.rollout_allocation is not None

    def loss_preset(self) -> dict:
        """Loss settings implied by the method (``loss.*`` keys), incl. the filter."""
        return {**self.loss, "filter_zero_adv": self.filter_zero_adv}


_REGISTRY = Registry("algorithm")
ALGORITHMS = _REGISTRY.factories


def register_algorithm(algo: Algorithm, *aliases: str) -> Algorithm:
    """Register ``algo`` under ``algo.name`` (and ``aliases``); returns it."""
    if not isinstance(algo, Algorithm):
        raise TypeError(f"algo: expected an Algorithm, got {type(algo).__name__}")
    _REGISTRY.register(algo.name, *aliases, factory=algo)
    return algo


def get_algorithm(name: str) -> Algorithm:
    """The registered :class:`Algorithm` called ``name`` (or an alias); ValueError if unknown."""
    return ALGORITHMS[_REGISTRY.canonical(name)]


# the algorithms `mtgrpo compare` runs when --algos is not given (kept here, beside the
# registry, so the CLI can name them without importing the training layer)
COMPARE_ALGOS = ("grpo", "dapo", "mtgrpo", "prompt-gdro", "rollout-gdro")


def algorithm_names(*, aliases: bool = False) -> tuple[str, ...]:
    """Registered algorithm names (and, with ``aliases=True``, their aliases)."""
    return _REGISTRY.names(aliases=aliases)


def _register_builtin() -> None:
    # Importing the controller packages registers their names (the bundles refer to them).
    from . import gdro, weighting  # noqa: F401

    register_algorithm(Algorithm(
        "grpo", "GRPO: one draw of B prompts with uniform task mix, every group kept", loss=_GRPO_LOSS))
    register_algorithm(Algorithm(
        "dapo", "DAPO: clip-higher, token-mean, zero-advantage groups filtered and redrawn",
        filter_zero_adv=True, loss=_DAPO_LOSS))
    register_algorithm(Algorithm(
        "mtgrpo", "MT-GRPO: improvement-aware task weights (IWU) + the ratio-preserving sampler",
        sampler="ratio-preserving", filter_zero_adv=True, weighting="iwu", loss=_DAPO_LOSS))
    register_algorithm(Algorithm(
        "sec-dapo", "SEC curriculum over tasks on top of DAPO", filter_zero_adv=True, weighting="sec",
        loss=_DAPO_LOSS), "sec")
    register_algorithm(Algorithm(
        "sec-grpo", "SEC curriculum over tasks on top of GRPO", weighting="sec", loss=_GRPO_LOSS))
    register_algorithm(Algorithm(
        "prompt-gdro", "Prompt-GDRO: advantages reweighted by difficulty bin (exponential weights)",
        advantage_weighting="prompt-gdro", loss=_DAPO_LOSS))
    register_algorithm(Algorithm(
        "rollout-gdro", "Rollout-GDRO: rollouts per prompt by difficulty bin at a fixed mean budget",
        rollout_allocation="sqrt", loss=_DAPO_LOSS))
    # MT-GRPO's ablations (its paper, section 5)
    register_algorithm(Algorithm(
        "mtgrpo-reward-only", "Ablation: Subroutine 2 (regularised reward-only weights) + RP sampler",
        sampler="ratio-preserving", filter_zero_adv=True, weighting="reward-only", loss=_DAPO_LOSS))
    register_algorithm(Algorithm(
        "iwu-no-rps", "Ablation: IWU task weights without the ratio-preserving sampler (mixed draw)",
        filter_zero_adv=True, weighting="iwu", loss=_DAPO_LOSS))
    register_algorithm(Algorithm(
        "rps-uniform", "Ablation: the ratio-preserving sampler with uniform task weights",
        sampler="ratio-preserving", filter_zero_adv=True, weighting="uniform", loss=_DAPO_LOSS))


_register_builtin()
