"""Group statistics shared by the trainer, the simulator and the integrations, built on
:func:`mtgrpo_core.group_advantages` (docs/ALGORITHMS.md section 1).

A *group* is the set of completions of one prompt; a group whose advantages are all zero
(all rewards equal, or a single completion) carries no gradient and is what DAPO's dynamic
sampling and MT-GRPO's ratio-preserving sampler filter out. Every caller asks this module,
so "zero-advantage" means exactly what the loss sees.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from ._validate import as_vector, check_positive_int

__all__ = ["group_labels", "group_advantages_np", "informative_groups", "per_task_mean"]


def group_labels(keys: Sequence[Hashable]) -> np.ndarray:
    """Dense int64 labels (first-appearance order) for any hashable group keys (uid strings)."""
    seen: dict = {}
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        out[i] = seen.setdefault(key, len(seen))
    return out


def _dense(name: str, group_of: Any, n: int) -> np.ndarray:
    g = np.asarray(group_of)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"{name}: expected a 1-D integer array of length {n}, got shape {g.shape}")
    if n and not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name}: expected integer group labels, got dtype {g.dtype}")
    if n and g.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got {int(g.min())}")
    return g.astype(np.int64, copy=False)


def group_advantages_np(rewards: Any, group_of: Any, *, scale: str = "group", clip: float | None = None) -> np.ndarray:
    """float64[N] advantages of :func:`mtgrpo_core.group_advantages` for numpy inputs
    (an empty batch gives an empty array)."""
    r = as_vector("rewards", rewards)
    g = _dense("group_of", group_of, r.shape[0])
    if r.size == 0:
        return np.zeros(0)
    from .ops import group_advantages

    a = group_advantages(torch.from_numpy(r), torch.from_numpy(g), scale=scale, clip=clip)
    return a.numpy().astype(np.float64, copy=False)


def informative_groups(rewards: Any, group_of: Any, num_groups: int | None = None) -> np.ndarray:
    """bool[G]: True for groups with a non-zero advantage (not all rewards equal, size > 1).

    Parameters
    ----------
    rewards : float[N]
    group_of : int[N]
        Dense group labels in ``[0, G)`` (see :func:`group_labels`).
    num_groups : int, optional
        G (default: ``max(group_of) + 1``); groups without responses are not informative.
    """
    r = as_vector("rewards", rewards)
    g = _dense("group_of", group_of, r.shape[0])
    G = (int(g.max()) + 1 if g.size else 0) if num_groups is None else check_positive_int(
        "num_groups", num_groups, minimum=0)
    if g.size and g.max() >= G:
        raise ValueError(f"group_of: expected labels < num_groups = {G}, got {int(g.max())}")
    out = np.zeros(G, bool)
    if r.size:
        a = group_advantages_np(r, g)
        np.logical_or.at(out, g, a != 0.0)
    return out


def per_task_mean(values: Any, task_ids: Any, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean[K], present[K]): the mean of ``values`` over each task's entries (0 where absent)."""
    v = as_vector("values", values)
    t = _dense("task_ids", task_ids, v.shape[0])
    K = check_positive_int("num_tasks", num_tasks)
    if t.size and t.max() >= K:
        raise ValueError(f"task_ids: expected values in [0, {K}), got max {int(t.max())}")
    cnt = np.bincount(t, minlength=K)
    return np.bincount(t, weights=v, minlength=K) / np.maximum(cnt, 1), cnt > 0
