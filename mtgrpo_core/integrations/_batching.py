"""Framework-free batch composers shared by the verl and TRL integrations.

What
----
* :class:`TaskBatchComposer` (MT-GRPO): each batch of ``B`` prompts holds task ``k`` exactly
  ``n_k`` times, ``n = target_counts(q, B)`` (largest remainder, sums to ``B``), with
  ``q_k ~ z_k m_k``: ``z`` the task weights of a controller from
  :mod:`mtgrpo_core.weighting` and ``m_k = min(1 / (1 - rho_k), cap)`` the acceptance-aware
  inflation of docs/ALGORITHMS.md section 3.3 (``rho_k`` = EMA of the task's share of zero-advantage
  groups), so that the *informative* prompts of a batch are in ratio ``z`` in expectation
  when the host trainer cannot run extra generation rounds. Prompts of a task are walked in
  a fresh random order per epoch of that task's pool (no prompt twice in a batch).
  ``observe(task_ids, rewards, group_ids)`` folds one generation batch's results in: per
  task accuracy ``J_k`` (EMA, :class:`~mtgrpo_core.weighting.TaskRewardTracker`), ``rho``,
  the mean |advantage| per task, then one weight update through the controller protocol
  (``controller.observe(TaskStats)``, :mod:`mtgrpo_core.weighting.protocol`).
* :class:`GDROBinComposer` (Prompt-GDRO realised by sampling): prompts are binned by
  :class:`~mtgrpo_core.gdro.DifficultyClassifier` (pass@k history), each batch holds bin
  ``b`` ``target_counts(q, B)`` times, ``q`` = :class:`~mtgrpo_core.gdro.PromptGDRO`'s
  distribution. ``observe(prompt_ids, rewards, group_ids)`` updates the classifier and the
  adversary with a per-response loss the host exposes (default ``1 - reward``).

Both are plain Python + numpy (the quota rounding is the C++ ``target_counts``); the
integrations wrap them in the host framework's sampler / trainer interface.
Cost: O(B + K) per batch for tasks; O(pool) per batch for bins (one classifier lookup of
every prompt id, about 10 ms at 100k prompts).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .._validate import check_positive_int
from ..gdro import DifficultyClassifier, make_advantage_weighting
from ..groups import group_advantages_np, group_labels, informative_groups, per_task_mean
from ..pools import PoolWalker
from ..sampling import target_counts
from ..weighting import TaskRewardTracker, TaskStats, make_weighting

__all__ = ["TaskBatchComposer", "GDROBinComposer", "group_labels"]


def _quota(q: np.ndarray, batch_size: int, capacity: np.ndarray) -> np.ndarray:
    """target_counts(q, B), then move any excess over a pool's capacity to the others (by q)."""
    q = np.where(capacity > 0, q, 0.0)
    if q.sum() <= 0:
        q = (capacity > 0).astype(np.float64)
    n = target_counts(q / q.sum(), batch_size).astype(np.int64)
    for _ in range(q.size):
        over = np.maximum(n - capacity, 0)
        if not over.any():
            break
        n = np.minimum(n, capacity)
        free = (n < capacity) & (q > 0)
        if not free.any():
            free = n < capacity
        share = np.where(free, np.maximum(q, 1e-12), 0.0)
        extra = target_counts(share / share.sum(), int(over.sum())).astype(np.int64)
        n = n + extra
    return n


class TaskBatchComposer:
    """Task-weighted, ratio-preserving batches of prompt indices (see module docstring).

    Parameters
    ----------
    task_of_row : sequence of hashable, length = dataset size
        The task (e.g. verl's ``data_source``) of each dataset row.
    batch_size : int
        Prompts per batch (B).
    weighting : str or a controller object
        A task-weighting name of :func:`mtgrpo_core.weighting.make_weighting` (``"iwu"``
        alias ``"mtgrpo"``, ``"reward-only"`` alias ``"regularized"``, ``"uniform"``,
        ``"sec"``) or an object following :class:`~mtgrpo_core.weighting.TaskWeighting`.
    acceptance_aware : bool
        Inflate each task's draw by ``min(1 / (1 - rho_k), acceptance_cap)`` (default True).
    acceptance_cap, rho_decay, reward_ema : float
        5.0, 0.9 and 0.5 as in the paper and its code.
    correct_threshold : float
        A rollout is correct (counts towards J_k) when its reward >= this (1.0).
    task_names : sequence, optional
        Fix the task order (default: sorted unique values of ``task_of_row``).
    seed : int
    controller_kwargs : dict
        Passed to the controller (e.g. ``lam=0.25``).
    """

    def __init__(self, task_of_row: Sequence[Hashable], batch_size: int, *, weighting: Any = "mtgrpo",
                 acceptance_aware: bool = True, acceptance_cap: float = 5.0, rho_decay: float = 0.9,
                 reward_ema: float = 0.5, correct_threshold: float = 1.0, task_names: Sequence | None = None,
                 seed: int = 0, controller_kwargs: dict | None = None):
        rows = list(task_of_row)
        if not rows:
            raise ValueError("task_of_row: the dataset is empty")
        check_positive_int("batch_size", batch_size)
        names = list(task_names) if task_names is not None else sorted({r for r in rows}, key=str)
        pos = {t: i for i, t in enumerate(names)}
        missing = [r for r in {r for r in rows} if r not in pos]
        if missing:
            raise ValueError(f"task_names: rows carry tasks {missing[:5]} that are not in task_names")
        self.task_names = names
        self.num_tasks = len(names)
        self.task_ids = np.array([pos[r] for r in rows], dtype=np.int64)
        members = [np.flatnonzero(self.task_ids == k) for k in range(self.num_tasks)]
        self.pool_sizes = np.array([m.size for m in members], dtype=np.int64)
        if batch_size > self.pool_sizes.sum():
            raise ValueError(f"batch_size: {batch_size} is larger than the dataset ({int(self.pool_sizes.sum())} rows)")
        self.batch_size = int(batch_size)
        self.controller = (make_weighting(weighting, self.num_tasks, **(controller_kwargs or {}))
                           if isinstance(weighting, str) else weighting)
        self.tracker = TaskRewardTracker(self.num_tasks, decay=reward_ema)
        self.acceptance_aware = bool(acceptance_aware)
        self.acceptance_cap = float(acceptance_cap)
        self.rho_decay = float(rho_decay)
        self.correct_threshold = float(correct_threshold)
        self.rho = np.zeros(self.num_tasks)
        self.rng = np.random.default_rng(seed)
        self._walk = PoolWalker(members, self.rng)
        self.batches = 0
        self.updates = 0
        self.last_counts = np.zeros(self.num_tasks, dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        """Current task weights z[K]."""
        return np.asarray(self.controller.weights, dtype=np.float64)

    def draw_shares(self) -> np.ndarray:
        """q[K], the task shares of the next batch (z, inflated by acceptance when enabled)."""
        z = self.weights
        if self.acceptance_aware:
            m = np.minimum(1.0 / np.maximum(1.0 - self.rho, 0.01), self.acceptance_cap)
            z = z * m
        return z / z.sum()

    def next_batch(self) -> np.ndarray:
        """Row indices int64[B] of the next batch, grouped by task."""
        n = _quota(self.draw_shares(), self.batch_size, self.pool_sizes)
        self.last_counts = n
        self.batches += 1
        return np.concatenate([self._walk.take(k, int(n[k])) for k in range(self.num_tasks) if n[k] > 0])

    def observe(self, task_ids: Any, rewards: Any, group_ids: Any = None, improvements: Any = None,
                update: bool = True) -> dict:
        """Fold one generation batch in and update the weights.

        Parameters
        ----------
        task_ids : int[N] (task indices) per rollout
        rewards : float[N] per rollout
        group_ids : int[N] group (prompt) label per rollout, for the zero-advantage share rho
        improvements : float[K] or None, forwarded to the controller (MT-GRPO's I_k)
        update : bool
            False: fold in J, rho and the mean |advantage| only; the weights move later
            through :meth:`update_weights` (a host that runs several generation rounds a
            step, or measures I_k after its optimiser step).

        Returns
        -------
        dict of metrics: per-task accuracy, zero-advantage share, weights.
        """
        t = np.asarray(task_ids, dtype=np.int64)
        r = np.asarray(rewards, dtype=np.float64)
        if t.shape != r.shape or t.ndim != 1:
            raise ValueError(f"rewards: expected the shape of task_ids {t.shape}, got {r.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.num_tasks):
            raise ValueError(f"task_ids: expected values in [0, {self.num_tasks}), got [{t.min()}, {t.max()}]")
        correct = (r >= self.correct_threshold).astype(np.float64)
        acc, present = per_task_mean(correct, t, self.num_tasks)
        J = self.tracker.update(acc, present)
        zero_frac = np.full(self.num_tasks, np.nan)
        mabs = None
        if group_ids is not None:
            g = np.asarray(group_ids)
            if g.shape != t.shape:
                raise ValueError(f"group_ids: expected shape {t.shape}, got {g.shape}")
            labels = group_labels(g.tolist())
            ngroups = int(labels.max()) + 1 if labels.size else 0
            first = np.full(ngroups, labels.size, dtype=np.int64)
            np.minimum.at(first, labels, np.arange(labels.size))
            flat = ~informative_groups(r, labels, ngroups)
            gt = t[first]
            ng = np.bincount(gt, minlength=self.num_tasks)
            nz = np.bincount(gt, weights=flat.astype(np.float64), minlength=self.num_tasks)
            has = ng > 0
            zero_frac = np.where(has, nz / np.maximum(ng, 1), np.nan)
            ema = self.rho_decay * self.rho + (1.0 - self.rho_decay) * np.nan_to_num(zero_frac)
            self.rho = np.where(has, ema, self.rho)
            mabs = per_task_mean(np.abs(group_advantages_np(r, labels)), t, self.num_tasks)[0]
        self.last_present, self.last_mean_abs_advantage = present, mabs
        z = (self.update_weights(improvements=improvements, present=present, mean_abs_advantage=mabs) if update
             else self.weights)
        out = {}
        for k, name in enumerate(self.task_names):
            out[f"task/{name}/accuracy"] = float(acc[k]) if present[k] else float("nan")
            out[f"task/{name}/accuracy_ema"] = float(J[k])
            out[f"task/{name}/weight"] = float(z[k])
            out[f"task/{name}/zero_adv_frac"] = float(zero_frac[k])
            out[f"task/{name}/filtered_ratio"] = float(self.rho[k])
        return out

    def update_weights(self, improvements: Any = None, present: Any = None,
                       mean_abs_advantage: Any = None) -> np.ndarray:
        """One controller update from the accuracy EMA ``J`` (:attr:`tracker`) and the given
        per-task statistics (float[K] each, or None); returns the new weights z[K]."""
        z = self.controller.observe(TaskStats.make(self.num_tasks, self.tracker.values, present=present,
                                                   improvements=improvements,
                                                   mean_abs_advantage=mean_abs_advantage))
        self.updates += 1
        return np.asarray(z, dtype=np.float64)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "tracker": self.tracker.state_dict(),
                "rho": self.rho.tolist(), "walk": self._walk.state_dict(), "rng": self.rng.bit_generator.state,
                "batches": self.batches, "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        self.controller.load_state_dict(d["controller"])
        self.tracker.load_state_dict(d["tracker"])
        self.rho = np.asarray(d["rho"], dtype=np.float64)
        self._walk.load_state_dict(d["walk"])
        self.rng.bit_generator.state = d["rng"]
        self.batches, self.updates = int(d["batches"]), int(d["updates"])


class GDROBinComposer:
    """Prompt-GDRO realised by sampling: batches hold difficulty bin ``b`` in share ``q_b``.

    Parameters
    ----------
    prompt_ids : sequence of hashable, length = dataset size
        A stable id of each row's prompt (verl: ``extra_info.index``).
    batch_size : int
    classifier_kwargs, gdro_kwargs : dict
        For :class:`DifficultyClassifier` and :class:`PromptGDRO`.
    correct_threshold : float
        A rollout is correct when its reward >= this.
    seed : int
    """

    def __init__(self, prompt_ids: Sequence[Hashable], batch_size: int, *, classifier_kwargs: dict | None = None,
                 gdro_kwargs: dict | None = None, correct_threshold: float = 1.0, seed: int = 0):
        self.prompt_ids = list(prompt_ids)
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the dataset is empty")
        check_positive_int("batch_size", batch_size)
        if batch_size > len(self.prompt_ids):
            raise ValueError(f"batch_size: {batch_size} is larger than the dataset ({len(self.prompt_ids)} rows)")
        self.batch_size = int(batch_size)
        self.classifier = DifficultyClassifier(**(classifier_kwargs or {}))
        self.gdro = make_advantage_weighting("prompt-gdro", self.classifier.num_groups, **(gdro_kwargs or {}))
        self.correct_threshold = float(correct_threshold)
        self.rng = np.random.default_rng(seed)
        self.last_counts = np.zeros(self.classifier.num_groups, dtype=np.int64)
        self.batches = 0

    def bins(self) -> np.ndarray:
        """Current bin of every dataset row (int64[n])."""
        return self.classifier.bins(self.prompt_ids)

    def next_batch(self) -> np.ndarray:
        b = self.bins()
        G = self.classifier.num_groups
        cap = np.bincount(b, minlength=G)
        n = _quota(self.gdro.distribution, self.batch_size, cap)
        self.last_counts = n
        self.batches += 1
        out = [self.rng.choice(np.flatnonzero(b == g), size=int(n[g]), replace=False) for g in range(G) if n[g] > 0]
        return np.concatenate(out).astype(np.int64)

    def observe(self, prompt_ids: Sequence[Hashable], rewards: Any, per_response_loss: Any = None) -> dict:
        """One generation batch: per-rollout prompt ids and rewards (and optionally the
        per-response loss; default ``1 - reward``). Bins are taken before the classifier
        update (history up to the previous step), then the classifier learns this step."""
        ids = list(prompt_ids)
        r = np.asarray(rewards, dtype=np.float64)
        if r.shape != (len(ids),):
            raise ValueError(f"rewards: expected shape ({len(ids)},), got {r.shape}")
        loss = 1.0 - r if per_response_loss is None else np.asarray(per_response_loss, dtype=np.float64)
        groups = self.classifier.bins(ids)
        q = self.gdro.observe(groups, loss)
        uniq = list(dict.fromkeys(ids))
        pos = {p: i for i, p in enumerate(uniq)}
        anyc = np.zeros(len(uniq), bool)
        for p, ok in zip(ids, r >= self.correct_threshold):
            anyc[pos[p]] |= bool(ok)
        self.classifier.update(uniq, anyc)
        out = {f"gdro/q/{g}": float(q[g]) for g in range(q.size)}
        out.update({f"gdro/batch_count/{g}": int(c) for g, c in enumerate(self.last_counts)})
        return out

    def state_dict(self) -> dict:
        return {"classifier": self.classifier.state_dict(), "gdro": self.gdro.state_dict(),
                "rng": self.rng.bit_generator.state, "batches": self.batches}

    def load_state_dict(self, d: dict) -> None:
        self.classifier.load_state_dict(d["classifier"])
        self.gdro.load_state_dict(d["gdro"])
        self.rng.bit_generator.state = d["rng"]
        self.batches = int(d["batches"])
