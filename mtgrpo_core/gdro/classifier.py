"""Online difficulty classifier for GDRO (docs/ALGORITHMS.md section 5.1; Panaganti et al., arXiv 2601.19280).

What: each prompt (stable id: int or str) keeps the last H = 50 values of
c(x) = 1 if any of its rollouts in a step was correct; p(x) = mean of that window
(cumulative while fewer than H visits). Bins by ``edges`` (default 0.1 ... 0.9 -> 10 bins,
bin 0 hardest: p < 0.1). Hysteresis delta: a seen prompt leaves its bin b only when
p >= upper_edge(b) + delta or p <= lower_edge(b) - delta; it then goes to p's raw bin.

Unseen prompts: ``unseen="separate"`` (default) gives them their own group,
``num_groups - 1``; ``"hardest"`` puts them in bin 0 like the reference code.
``bins(ids)`` classifies from the history recorded up to the previous ``update`` (call it
before generation, on the batch about to be generated); ``update(ids, any_correct)``
records this step's outcome. Duplicate ids in one ``update`` are OR-ed (so per-response
arrays may be passed).

Layout (vectorised): a dict maps id -> slot; per slot numpy arrays hold a ring buffer
``hist[slots, H]`` (uint8), the window sum, the visit count and the current bin. A
classify or update of 512 prompts is one dict lookup per id plus O(batch) numpy work.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..weighting._common import MAX_WINDOW, as_vector, check_choice, check_float, check_positive_int, check_state

__all__ = ["DifficultyClassifier"]

DEFAULT_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _ids_list(name: str, prompt_ids: Any) -> list:
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array of ids, got shape {prompt_ids.shape}")
        if np.issubdtype(prompt_ids.dtype, np.integer):
            return prompt_ids.tolist()
        if prompt_ids.dtype.kind in "US":
            return [str(x) for x in prompt_ids.tolist()]
        if prompt_ids.dtype != object:
            raise ValueError(f"{name}: expected integer or string ids, got dtype {prompt_ids.dtype}")
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(f"{name}: expected a sequence of ids, got {type(prompt_ids).__name__}")
    out = list(prompt_ids)
    for x in out:
        if isinstance(x, bool) or not isinstance(x, (int, str, np.integer)):
            raise ValueError(f"{name}: ids must be int or str, got {x!r} ({type(x).__name__})")
    return [int(x) if isinstance(x, np.integer) else x for x in out]


class DifficultyClassifier:
    """Windowed pass@k difficulty bins with hysteresis.

    Parameters
    ----------
    edges : sequence of float
        Strictly increasing, inside (0, 1). ``len(edges) + 1`` difficulty bins.
    window : int
        H, the number of most recent visits per prompt (50).
    hysteresis : float
        delta >= 0 (0.03).
    unseen : {"separate", "hardest"}
    """

    kind = "DifficultyClassifier"

    def __init__(self, edges: Sequence[float] = DEFAULT_EDGES, window: int = 50, hysteresis: float = 0.03,
                 unseen: str = "separate"):
        e = as_vector("edges", edges)
        if e.size == 0 or np.any(e <= 0) or np.any(e >= 1) or np.any(np.diff(e) <= 0):
            raise ValueError("edges: expected a strictly increasing non-empty sequence inside (0, 1), "
                             f"got {e.tolist()}")
        self.edges = e
        # window bytes a prompt: 1e10 (a config typo) allocated 640 GB before this bound
        self.window = check_positive_int("window", window, 1, MAX_WINDOW)
        self.hysteresis = check_float("hysteresis", hysteresis, 0.0, 0.5)
        self.unseen = check_choice("unseen", unseen, ("separate", "hardest"))
        self.num_bins = int(e.size + 1)
        self.num_groups = self.num_bins + (1 if self.unseen == "separate" else 0)
        self.unseen_group = self.num_groups - 1 if self.unseen == "separate" else 0
        # lower / upper edge of each bin (-inf / +inf outside)
        self._lo = np.concatenate([[-np.inf], e])
        self._hi = np.concatenate([e, [np.inf]])
        self._slot: dict = {}
        self._alloc(64)
        self._n = 0

    # -- storage -------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        self._hist = np.zeros((cap, self.window), np.uint8)
        self._sum = np.zeros(cap, np.int64)
        self._count = np.zeros(cap, np.int64)
        self._bin = np.zeros(cap, np.int64)

    def _grow(self, need: int) -> None:
        cap = self._hist.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        h, s, c, b = self._hist, self._sum, self._count, self._bin
        self._alloc(new)
        self._hist[:cap], self._sum[:cap], self._count[:cap], self._bin[:cap] = h, s, c, b

    def __len__(self) -> int:
        return self._n

    # -- queries -------------------------------------------------------------------------
    def _lookup(self, ids: list) -> np.ndarray:
        get = self._slot.get
        return np.array([get(x, -1) for x in ids], dtype=np.int64)

    def bins(self, prompt_ids: Any) -> np.ndarray:
        """Group of each prompt (int64[n]) from the history up to the last ``update``;
        unseen prompts -> ``unseen_group``."""
        slots = self._lookup(_ids_list("prompt_ids", prompt_ids))
        seen = slots >= 0
        return np.where(seen, self._bin[np.where(seen, slots, 0)], self.unseen_group)

    def pass_rates(self, prompt_ids: Any) -> np.ndarray:
        """Windowed pass@k p(x) (float64[n]); NaN for unseen prompts."""
        slots = self._lookup(_ids_list("prompt_ids", prompt_ids))
        seen = slots >= 0
        s = np.where(seen, slots, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = self._sum[s] / np.minimum(self._count[s], self.window)
        return np.where(seen, p, np.nan)

    def raw_bins(self, p: np.ndarray) -> np.ndarray:
        """Bin of a pass rate without hysteresis (bin b holds edges[b-1] <= p < edges[b])."""
        return np.searchsorted(self.edges, p, side="right")

    # -- update --------------------------------------------------------------------------
    def update(self, prompt_ids: Any, any_correct: Any) -> None:
        """Record this step's outcome c(x) for each prompt (bool[n]; duplicates are OR-ed)."""
        ids = _ids_list("prompt_ids", prompt_ids)
        c = np.asarray(any_correct)
        if c.ndim != 1 or c.shape[0] != len(ids):
            raise ValueError(f"any_correct: expected a 1-D array of length {len(ids)}, got shape {c.shape}")
        if c.dtype != np.bool_:
            c = as_vector("any_correct", c, len(ids))
            if np.any((c != 0) & (c != 1)):
                raise ValueError("any_correct: expected booleans or 0/1 values")
            c = c.astype(bool)
        if not ids:
            return
        slots = self._lookup(ids)
        new = np.flatnonzero(slots < 0)
        if new.size:
            fresh = {}
            for i in new.tolist():
                key = ids[i]
                s = fresh.get(key)
                if s is None:
                    s = self._n + len(fresh)
                    fresh[key] = s
                slots[i] = s
            self._grow(self._n + len(fresh))
            self._slot.update(fresh)
            self._n += len(fresh)
        if len(ids) > 1:
            uniq, inv = np.unique(slots, return_inverse=True)
            if uniq.size != slots.size:  # duplicates: one visit per prompt, outcomes OR-ed
                c = np.bincount(inv, weights=c, minlength=uniq.size) > 0
                slots = uniq
        cnt = self._count[slots]
        pos = cnt % self.window
        old = self._hist[slots, pos].astype(np.int64)
        full = cnt >= self.window
        val = c.astype(np.uint8)
        self._hist[slots, pos] = val
        self._sum[slots] += val.astype(np.int64) - np.where(full, old, 0)
        cnt = cnt + 1
        self._count[slots] = cnt
        p = self._sum[slots] / np.minimum(cnt, self.window)
        raw = self.raw_bins(p)
        cur = self._bin[slots]
        d = self.hysteresis
        move = (p >= self._hi[cur] + d) | (p <= self._lo[cur] - d)
        self._bin[slots] = np.where((cnt == 1) | move, raw, cur)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able: ids, each window in visit order as a '0'/'1' string, visit counts, bins."""
        ids = [None] * self._n
        for k, s in self._slot.items():
            ids[s] = k
        cnt = self._count[: self._n]
        windows = []
        for s in range(self._n):
            n = int(cnt[s])
            if n <= self.window:
                row = self._hist[s, :n]
            else:
                start = n % self.window
                row = np.concatenate([self._hist[s, start:], self._hist[s, :start]])
            windows.append("".join("1" if v else "0" for v in row.tolist()))
        return {"type": self.kind, "edges": self.edges.tolist(), "window": self.window,
                "hysteresis": self.hysteresis, "unseen": self.unseen, "ids": ids, "windows": windows,
                "counts": cnt.tolist(), "bins": self._bin[: self._n].tolist()}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, edges=self.edges.tolist(), window=self.window, unseen=self.unseen)
        for key in ("ids", "windows", "counts", "bins", "hysteresis"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        ids, windows, counts, bins = d["ids"], d["windows"], d["counts"], d["bins"]
        n = len(ids)
        if not (len(windows) == len(counts) == len(bins) == n):
            raise ValueError("state_dict: ids, windows, counts and bins must have the same length")
        hysteresis = check_float("state_dict['hysteresis']", d["hysteresis"], 0.0, 0.5)
        # validate every entry before touching the live state (a bad state changes nothing)
        for key, w, c, b in zip(ids, windows, counts, bins):
            if (not isinstance(w, str) or isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0
                    or isinstance(b, bool) or not isinstance(b, (int, np.integer))
                    or len(w) != min(int(c), self.window) or not 0 <= int(b) < self.num_bins
                    or w.strip("01") != ""):
                raise ValueError(f"state_dict: inconsistent entry for id {key!r}")
        if len(set(ids)) != n:
            raise ValueError("state_dict['ids']: duplicate prompt ids")
        self.hysteresis = hysteresis
        self._slot = {}
        self._alloc(max(64, n))
        self._n = n
        for s, (key, w, c, b) in enumerate(zip(ids, windows, counts, bins)):
            c = int(c)
            vals = np.frombuffer(w.encode(), np.uint8) - ord("0")
            if c <= self.window:
                self._hist[s, :c] = vals
            else:
                start = c % self.window
                k = self.window - start
                self._hist[s, start:] = vals[:k]
                self._hist[s, :start] = vals[k:]
            self._sum[s] = int(vals.sum())
            self._count[s] = c
            self._bin[s] = int(b)
            self._slot[key] = s
