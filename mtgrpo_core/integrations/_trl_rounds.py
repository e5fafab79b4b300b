"""Generation rounds for the TRL integration: the per-row tensors of several TRL generation
outputs joined into one batch of fixed shape (issue 23).

What
----
TRL's ``_generate_and_score_completions`` returns a dict of per-row tensors. With
acceptance-aware rounds (``MTGRPOTrainer(max_generation_rounds=R)``) a generation batch is
assembled from the groups of up to R such outputs. :func:`join_rows` picks rows out of
them, in a given order, and pads every tensor to the widest round: prompts on the left (as
TRL pads them), completion-aligned tensors on the right. ``num_items_in_batch`` is
recomputed by the caller from the joined masks.

Only text fields are supported: a multimodal key (``pixel_values``, ...) raises ValueError
naming it, since its rows are not aligned with the completions.
Cost: one copy of the kept rows, O(rows x width).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["join_rows", "LEFT_PADDED", "RIGHT_PADDED", "ROW_KEYS"]

#: keys padded on the left (value: pad value; None = the tokenizer's pad id)
LEFT_PADDED = {"prompt_ids": None, "prompt_mask": 0}
#: completion-aligned keys padded on the right
RIGHT_PADDED = {"completion_ids": None, "completion_mask": 0, "old_per_token_logps": 0.0,
                "ref_per_token_logps": 0.0, "sampling_per_token_logps": 0.0, "tool_mask": 1,
                "importance_sampling_ratio": 0.0, "advantages": 0.0}
#: keys recomputed by the caller, not joined
ROW_KEYS = ("num_items_in_batch",)


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    return F.pad(t, (extra, 0) if left else (0, extra), value=value)


def join_rows(parts: Sequence[dict], picks: Sequence[tuple[int, int]], pad_token_id: int,
              skip: Sequence[str] = ()) -> dict:
    """The rows ``picks`` = [(part, row), ...] of the TRL output dicts ``parts``, in that order.

    Every part must hold the same keys. 1-D tensors are gathered; 2-D tensors are padded to
    the widest part (``LEFT_PADDED`` keys on the left, the others on the right); keys in
    ``ROW_KEYS`` and ``skip`` are left out (the caller sets them).
    """
    if not parts:
        raise ValueError("parts: expected at least one generation output, got none")
    if not picks:
        raise ValueError("picks: expected at least one row, got none")
    keys = [k for k in parts[0] if k not in ROW_KEYS and k not in skip]
    for i, p in enumerate(parts):
        if set(k for k in p if k not in ROW_KEYS and k not in skip) != set(keys):
            raise ValueError(f"parts[{i}]: keys {sorted(p)} differ from parts[0]'s {sorted(parts[0])}")
    bad = [k for k in keys if k not in LEFT_PADDED and k not in RIGHT_PADDED]
    if bad:
        raise ValueError(f"parts: generation rounds support text batches only; cannot join the keys {bad}")
    pk = np.asarray(picks, dtype=np.int64).reshape(-1, 2)
    if (pk[:, 0] < 0).any() or (pk[:, 0] >= len(parts)).any():
        raise ValueError(f"picks: part indices must lie in [0, {len(parts)})")
    out = {}
    for key in keys:
        if all(parts[i][key] is None for i in range(len(parts))):
            out[key] = None
            continue
        left = key in LEFT_PADDED
        value = (LEFT_PADDED if left else RIGHT_PADDED)[key]
        if value is None:
            value = pad_token_id
        ts = [p[key] for p in parts]
        if any(t is None or not torch.is_tensor(t) for t in ts):
            raise ValueError(f"parts: {key!r} is a tensor in some rounds and not in others")
        width = max(t.shape[1] for t in ts) if ts[0].dim() == 2 else None
        chunks, order = [], []
        for i, t in enumerate(ts):
            sel = np.flatnonzero(pk[:, 0] == i)
            if not sel.size:
                continue
            rows = torch.as_tensor(pk[sel, 1], dtype=torch.long, device=t.device)
            if (pk[sel, 1] < 0).any() or (pk[sel, 1] >= t.shape[0]).any():
                raise ValueError(f"picks: row indices of part {i} must lie in [0, {t.shape[0]})")
            x = t.index_select(0, rows)
            if width is not None:
                x = _pad_to(x, width, value, left)
            chunks.append(x)
            order.append(sel)
        joined = torch.cat(chunks, 0)
        inv = np.empty(len(pk), dtype=np.int64)
        inv[np.concatenate(order)] = np.arange(len(pk))
        out[key] = joined.index_select(0, torch.as_tensor(inv, dtype=torch.long, device=joined.device))
    return out
