"""Reference (oracle) for per-task masked sums and the multi-task weighted loss.

What: for values ``[N, T]``, a mask ``[N, T]`` and one task id per row ``task_ids[N]``,

* ``sums[k] = sum_{n: task_ids[n] = k} sum_t values[n, t] * [mask[n, t] != 0]``,
  ``counts[k]`` the number of selected tokens of task ``k``;
* the MT-GRPO multi-task objective ``L = sum_k w_k * sums[k] / counts[k]``
  ("task-token-mean": each task's token-mean loss, weighted by the task weights ``w``;
  tasks with no tokens contribute 0) or ``L = sum_k w_k * sums[k] / sum_k counts[k]``
  ("token-mean": the weighted token sum over the global token count, verl's token-mean
  aggregation with per-task weights).

Algorithm: ``torch.where`` selects the masked values (a masked-out NaN never enters the
sum), a row sum gives one number per sequence, and ``index_add`` scatters the row sums and
row counts into the ``K`` task bins. Readable, not fast: it materialises an ``[N, T]``
temporary (plus a float32 copy of bf16/fp16 inputs). Differentiable through autograd.

Cost: about three passes over ``N*T`` elements; ``O(N*T)`` adds.

Source: MT-GRPO task-weighted objective (docs/ALGORITHMS.md section 3); the masked token-mean follows
verl's ``agg_loss(loss_agg_mode="token-mean")`` (``verl/trainer/ppo/core_algos.py``).
"""
from __future__ import annotations

import torch

__all__ = ["task_masked_sum_ref", "task_weighted_loss_ref", "accumulate_dtype"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 values, float32 for everything else (bf16/fp16/fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_masked_sum_ref(values: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                        num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task sum and count of the masked values.

    Parameters
    ----------
    values : Tensor [N, T], floating
    mask : Tensor [N, T], bool or numeric (nonzero = selected)
    task_ids : Tensor [N], integer in ``[0, num_tasks)``
    num_tasks : int, K

    Returns
    -------
    sums : Tensor [K], float32 (float64 for float64 values)
    counts : Tensor [K], int64
    """
    acc = accumulate_dtype(values.dtype)
    sel = mask != 0
    picked = torch.where(sel, values.to(acc), torch.zeros((), dtype=acc, device=values.device))
    row_sums = picked.sum(dim=1)
    row_counts = sel.sum(dim=1, dtype=torch.int64)
    ids = task_ids.to(torch.int64)
    sums = torch.zeros(num_tasks, dtype=acc, device=values.device).index_add(0, ids, row_sums)
    counts = torch.zeros(num_tasks, dtype=torch.int64, device=values.device).index_add(0, ids, row_counts)
    return sums, counts


def task_weighted_loss_ref(token_loss: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                           task_weights: torch.Tensor, normalize: str = "task-token-mean") -> torch.Tensor:
    """Weighted multi-task loss (differentiable in ``token_loss`` and ``task_weights``).

    Parameters
    ----------
    token_loss : Tensor [N, T], floating
    mask : Tensor [N, T], bool or numeric
    task_ids : Tensor [N], integer in ``[0, K)``
    task_weights : Tensor [K]
    normalize : "task-token-mean" (``sum_k w_k * mean of task k``) or "token-mean"
        (``sum_k w_k * sum of task k / total token count``).

    Returns
    -------
    Tensor [] (float32, float64 for float64 token_loss); 0 when no token is selected.
    """
    acc = accumulate_dtype(token_loss.dtype)
    sums, counts = task_masked_sum_ref(token_loss, mask, task_ids, task_weights.shape[0])
    w = task_weights.to(acc)
    if normalize == "task-token-mean":
        has = counts > 0
        per_task = torch.where(has, sums / counts.clamp_min(1).to(acc), torch.zeros_like(sums))
        return (w * per_task).sum()
    if normalize == "token-mean":
        total = counts.sum().clamp_min(1).to(acc)
        return (w * sums).sum() / total
    raise ValueError(f"normalize: expected 'task-token-mean' or 'token-mean', got {normalize!r}")
