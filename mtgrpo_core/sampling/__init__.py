"""Task-ratio-preserving prompt sampling for multi-task GRPO (the core is C++).

:class:`RatioPreservingSampler` builds each step's batch of *informative* prompts (rollout
groups with non-zero advantage) so that task ``k`` holds ``n_k ~ z_k B`` of them although
tasks are filtered at very different rates: it oversamples in rounds, inflating each task's
share by ``min(1 / (1 - rho_k), acceptance_cap)`` where ``rho_k`` is an EMA of the task's
filtered ratio (acceptance-aware sampling, MT-GRPO arXiv 2602.05547; ALGORITHMS.md 2.3).
Later rounds draw from ``z*m`` until B prompts are accepted, then from the per-task
deficits (``refill="fill-then-deficit"``, the released code) or from the deficits at once
(``refill="deficit"``, the paper's Algorithm 2).

Typical loop::

    s = RatioPreservingSampler(pool_sizes, batch_size=256, seed=0)
    s.start_step(weights)                       # z, sums to 1
    while (draw := s.next_round()) is not None:
        accepted = generate_score_and_filter(draw.task_ids, draw.prompt_indices)
        s.report(draw.task_ids, draw.prompt_indices, accepted)
    batch = s.finish()                          # batch.task_ids / prompt_indices / realized ...

The algorithm, the PRNG (PCG32) and the exact order of random calls are documented in
:mod:`mtgrpo_core.reference.sampler`, a pure-Python twin that gives bit-identical batches.
Cost (C++): O(K) floating point and O(prompts drawn) integer work a step, independent of
the pool sizes (pool order is a keyed Feistel permutation, O(1) memory a task); about
0.1 ms a step at B=1024, K=9 on a 2-core VM (bench/bench_sampler.py).
"""
from __future__ import annotations

import operator
import secrets
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from .. import _native
from ..reference.sampler import (INFLATIONS, MAX_MULTINOMIAL_DRAWS, MAX_TOTAL, REFILLS, ROUNDINGS, BatchRef,
                                 RatioPreservingSamplerRef, _check_total, target_counts_ref)

__all__ = ["RatioPreservingSampler", "RoundDraw", "SampledBatch", "target_counts", "MAX_BATCH_SIZE",
           "MAX_MULTINOMIAL_BATCH_SIZE", "REFILLS", "INFLATIONS"]

#: Largest batch size (any rounding): 2**53, the largest integer a double holds exactly.
MAX_BATCH_SIZE = MAX_TOTAL
#: Largest batch size, and prompts a round, with ``rounding="multinomial"``: 2**22. The draw
#: costs one random number a prompt (2**31 took hours in the Python twin), so larger sizes
#: raise ValueError instead of running; ``largest-remainder`` is O(K) for any size.
MAX_MULTINOMIAL_BATCH_SIZE = MAX_MULTINOMIAL_DRAWS

_BACKENDS = ("auto", "cpp", "python")


@dataclass(frozen=True)
class RoundDraw:
    """Prompts to generate in one round: ``task_ids`` int32[R], ``prompt_indices`` int64[R]
    (index into that task's pool), grouped by task in ascending order."""

    task_ids: np.ndarray
    prompt_indices: np.ndarray

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])


class SampledBatch(BatchRef):
    """The step's batch of accepted prompts, grouped by task.

    task_ids int32[b], prompt_indices int64[b] with ``b = min(B, accepted)``; targets int64[K]
    (the n_k, summing to B); realized int64[K] (task counts in the batch); rounds (rounds
    drawn); shortfall = B - b; num_drawn / num_accepted (prompts drawn / accepted this step).
    """

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])


def _int(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None


def _float(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}") from None


def _seed(seed, name: str = "seed") -> int:
    if seed is None:
        return secrets.randbits(64)
    s = _int(seed, name)
    if not 0 <= s < 2**64:
        raise ValueError(f"{name}: must lie in [0, 2**64), got {s}")
    return s


def _weights(weights) -> np.ndarray:
    if hasattr(weights, "detach"):  # torch tensor
        weights = weights.detach().cpu().numpy()
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"weights: expected a 1-d array of floats, got {type(weights).__name__}") from None
    if w.ndim != 1:
        raise ValueError(f"weights: expected a 1-d array, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w)


def _index_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":  # an empty list
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {tuple(a.shape)}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: value {a.max()} is out of range")
    return np.ascontiguousarray(a, dtype=np.int64)


def _bool_array(x, name: str = "accepted") -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":
        a = a.astype(bool)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {tuple(a.shape)}")
    if a.dtype.kind == "b":
        return np.ascontiguousarray(a).view(np.uint8)
    if a.dtype.kind in "iu":
        bad = np.flatnonzero((a != 0) & (a != 1))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] = {a[bad[0]]} is not a boolean (0/1)")
        return np.ascontiguousarray(a, dtype=np.uint8)
    raise TypeError(f"{name}: expected a bool array, got dtype {a.dtype}")


def target_counts(weights, batch_size: int, method: str = "largest-remainder", seed: int | None = None) -> np.ndarray:
    """Per-task target counts ``n`` (int64[K]) with ``sum(n) == batch_size`` exactly.

    Parameters
    ----------
    weights : array-like float[K]
        Task weights z: finite, >= 0, summing to 1 within 1e-6.
    batch_size : int
        B > 0; at most :data:`MAX_BATCH_SIZE` (2**53), and at most
        :data:`MAX_MULTINOMIAL_BATCH_SIZE` (2**22) with ``method="multinomial"`` (ValueError
        otherwise: the multinomial costs one draw a prompt).
    method : {"largest-remainder", "multinomial"}
        ``largest-remainder`` (deterministic): ``floor(z_k B)`` plus one for the largest
        remainders, so ``|n_k - z_k B| < 1``. ``multinomial``: ``Multinomial(B, z)`` drawn
        with PCG32(seed) (the paper's choice).
    seed : int, optional
        Seed of the multinomial draw (fresh entropy when None); ignored otherwise.
    """
    w = _weights(weights)
    if w.shape[0] == 0:
        raise ValueError("weights: need at least one task, got 0")
    B = _int(batch_size, "batch_size")
    if B <= 0:
        raise ValueError(f"batch_size: must be positive, got {B}")
    if method not in ROUNDINGS:
        raise ValueError(f"method: expected 'largest-remainder' or 'multinomial', got {method!r}")
    _check_total(B, method)
    s = _seed(seed)
    if _native.has("sampler_target_counts"):
        return _native.native().sampler_target_counts(w, B, method, s)
    return target_counts_ref(w, B, method, s)


class RatioPreservingSampler:
    """Ratio-preserving sampler with acceptance-aware oversampling (see module docstring).

    Parameters
    ----------
    pool_sizes : sequence of int, length K
        Prompts in each task's pool (indices ``0 .. pool_sizes[k]-1``); 0 allowed for a task
        that never gets weight. Each pool is walked in a fresh random order per epoch.
    batch_size : int
        B, accepted prompts wanted per step; at most :data:`MAX_BATCH_SIZE`, and at most
        :data:`MAX_MULTINOMIAL_BATCH_SIZE` (also for ``oversample * B``) with
        ``rounding="multinomial"``. A ``state_dict`` is held to the same bounds.
    oversample : float
        Prompts drawn a round = ``floor(oversample * B + 0.5)`` (paper: 3).
    max_rounds : int
        At most this many rounds a step (paper: 10 for 3 tasks, 2 for 9).
    acceptance_cap : float
        Cap of the inflation ``m_k = min(1 / (1 - rho_k), acceptance_cap)`` (paper: 5).
    rho_decay : float
        EMA decay of the filtered ratio: ``rho <- d rho + (1 - d) frac`` (paper: 0.9).
    rounding : {"largest-remainder", "multinomial"}
        How targets and round allocations are rounded to integers.
    seed : int
        PCG32 seed in [0, 2**64); same seed + same reports = same batches on every platform.
    acceptance_aware : bool
        False: draw rounds from ``z`` / deficits alone (``m = 1``), the paper's baseline
        (and the released Exp-1 scripts' setting).
    refill : {"fill-then-deficit", "deficit"}
        What rounds after the first draw from. ``"fill-then-deficit"`` (default, the released
        MT-GRPO trainer): ``z*m`` while fewer than B prompts are accepted in total, then
        ``deficit*m``; ``"deficit"`` (the paper's Algorithm 2): ``deficit*m`` from round 2 on.
        With one hard task (acceptance 0.03, weight 0.35, cap 2, 2 rounds, B = 256) the
        deficit rule's batch was short on every step, fill-then-deficit's on none
        (bench/bench_sampler.py).
    inflation : {"per-step", "per-round"}
        ``m_k`` computed once at ``start_step`` (default) or again before every round from
        the rho of the rounds closed so far (the released trainer).
    warmup_steps : int
        The first ``warmup_steps`` steps do not enforce ratios: rounds draw from ``z*m``
        until B prompts are accepted in total and ``finish`` picks B of them uniformly,
        whatever their task (the released Exp-2 scripts: 10). Default 0.
    backend : {"auto", "cpp", "python"}
        ``cpp`` (the C++ core), ``python`` (the reference), ``auto``: C++ when built.
    """

    def __init__(self, pool_sizes: Sequence[int], batch_size: int, *, oversample: float = 3.0, max_rounds: int = 10,
                 acceptance_cap: float = 5.0, rho_decay: float = 0.9, rounding: str = "largest-remainder",
                 seed: int = 0, acceptance_aware: bool = True, refill: str = "fill-then-deficit",
                 inflation: str = "per-step", warmup_steps: int = 0, backend: str = "auto"):
        ps = _index_array(pool_sizes, "pool_sizes")
        if ps.shape[0] == 0:
            raise ValueError("pool_sizes: need at least one task, got 0")
        bad = np.flatnonzero((ps < 0) | (ps > 2**32 - 1))
        if bad.size:
            raise ValueError(f"pool_sizes[{bad[0]}] = {ps[bad[0]]} is outside [0, 2**32 - 1]")
        B = _int(batch_size, "batch_size")
        if B <= 0:
            raise ValueError(f"batch_size: must be positive, got {B}")
        args = dict(oversample=_float(oversample, "oversample"), max_rounds=_int(max_rounds, "max_rounds"),
                    acceptance_cap=_float(acceptance_cap, "acceptance_cap"), rho_decay=_float(rho_decay, "rho_decay"))
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding: expected 'largest-remainder' or 'multinomial', got {rounding!r}")
        _check_total(B, rounding)
        if refill not in REFILLS:
            raise ValueError(f"refill: expected one of {REFILLS}, got {refill!r}")
        if inflation not in INFLATIONS:
            raise ValueError(f"inflation: expected one of {INFLATIONS}, got {inflation!r}")
        warmup_steps = _int(warmup_steps, "warmup_steps")
        if not 0 <= warmup_steps < 2**63:
            raise ValueError(f"warmup_steps: must lie in [0, 2**63), got {warmup_steps}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        if backend == "cpp" and not _native.has("RatioPreservingSamplerCore"):
            _native.native()  # raises the actionable build error
            raise RuntimeError("backend='cpp': the extension has no RatioPreservingSamplerCore; "
                               "rebuild with `make build`")
        s = _seed(seed)
        has_cpp = _native.has("RatioPreservingSamplerCore")
        self.backend = "cpp" if backend == "cpp" or (backend == "auto" and has_cpp) else "python"
        self.num_tasks = int(ps.shape[0])
        self.batch_size = B
        if self.backend == "cpp":
            self._core = _native.native().RatioPreservingSamplerCore(
                ps, B, args["oversample"], args["max_rounds"], args["acceptance_cap"], args["rho_decay"], rounding, s,
                bool(acceptance_aware), refill, inflation, warmup_steps)
        else:
            self._core = RatioPreservingSamplerRef(ps, B, rounding=rounding, seed=s,
                                                   acceptance_aware=bool(acceptance_aware), refill=refill,
                                                   inflation=inflation, warmup_steps=warmup_steps, **args)

    def start_step(self, weights) -> None:
        """Begin a step with task weights ``weights`` float[K] (>= 0, sum 1 within 1e-6)."""
        self._core.start_step(_weights(weights))

    def next_round(self) -> RoundDraw | None:
        """The next round's prompts, or None when every quota is met, ``max_rounds`` were
        drawn or no prompt is left to draw. Closing a round updates ``filtered_ratios``."""
        out = self._core.next_round()
        if out is None:
            return None
        return RoundDraw(task_ids=out[0], prompt_indices=out[1])

    def report(self, task_ids, prompt_indices, accepted) -> None:
        """Mark prompts drawn this step as accepted (kept by the zero-advantage filter) or not.

        ``task_ids`` / ``prompt_indices`` int[n], ``accepted`` bool[n]; any subset of the
        step's draws, each at most once; prompts never reported count as not accepted.
        """
        t = _index_array(task_ids, "task_ids")
        p = _index_array(prompt_indices, "prompt_indices")
        a = _bool_array(accepted)
        if p.shape[0] != t.shape[0]:
            raise ValueError(f"prompt_indices: length {p.shape[0]} does not match task_ids length {t.shape[0]}")
        if a.shape[0] != t.shape[0]:
            raise ValueError(f"accepted: length {a.shape[0]} does not match task_ids length {t.shape[0]}")
        self._core.report(t, p, a)

    def finish(self) -> SampledBatch:
        """Select the batch (quota per task, then a uniform top-up) and end the step."""
        b = self._core.finish()
        return SampledBatch(**(b.__dict__ if isinstance(b, BatchRef) else b))

    @property
    def filtered_ratios(self) -> np.ndarray:
        """rho float64[K]: EMA of each task's filtered (rejected) share, starting at 0."""
        r = self._core.filtered_ratios
        return r() if callable(r) else r

    @property
    def step_active(self) -> bool:
        return self._core.step_active() if self.backend == "cpp" else self._core.step is not None

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (RNG, rho, pool permutations, and the step in
        progress if any): a dict of ints, floats, strings and numpy arrays. The layout is
        shared by both backends, so a state moves between them."""
        return self._core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (pool_sizes must match; hyperparameters come from
        the state). Raises ValueError naming the bad key; the sampler is unchanged then."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        self._core.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"RatioPreservingSampler(num_tasks={self.num_tasks}, batch_size={self.batch_size}, "
                f"backend={self.backend!r})")
