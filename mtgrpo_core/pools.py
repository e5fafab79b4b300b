"""The prompt-pool walker shared by the trainer, the simulator and the integrations.

:class:`PoolWalker` walks each of K pools in a random order without replacement within an
epoch of that pool (reshuffled when exhausted), the order docs/ALGORITHMS.md section 3.3
asks for. :class:`MixedSampler` draws prompts for the algorithms without the
ratio-preserving sampler: each prompt's task ~ Categorical(p), its index from the walker.
:class:`DynamicSampling` runs sampling rounds of mixed draws in the ratio-preserving
sampler's interface (DAPO's dynamic sampling when filtering). All are numpy-only and restore
exactly through ``state_dict``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validate import as_vector, check_positive_int

__all__ = ["PoolWalker", "MixedSampler", "DynamicSampling"]


class PoolWalker:
    """Random walk over K pools, without replacement within an epoch of each pool.

    Parameters
    ----------
    pools : sequence of int or of 1-D int arrays
        Pool ``k``'s size (members ``0 .. n-1``) or its members (e.g. dataset rows).
    rng : numpy.random.Generator
        Shared with the caller (its state is the caller's to save).
    """

    def __init__(self, pools: Sequence[Any], rng: np.random.Generator):
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy Generator, got {type(rng).__name__}")
        members = []
        for k, p in enumerate(pools):
            if np.ndim(p) == 0:
                members.append(np.arange(check_positive_int(f"pools[{k}]", p, minimum=0), dtype=np.int64))
            else:
                members.append(np.asarray(p, dtype=np.int64).reshape(-1))
        if not members:
            raise ValueError("pools: expected at least one pool, got none")
        self.members = members
        self.rng = rng
        self.order = [self.rng.permutation(m) for m in self.members]
        self.pos = [0] * len(self.members)

    @property
    def sizes(self) -> list[int]:
        return [int(m.size) for m in self.members]

    def next(self, k: int) -> int:
        """The next member of pool ``k`` (a fresh epoch order when the pool is exhausted)."""
        if self.pos[k] >= self.members[k].size:
            self.order[k] = self.rng.permutation(self.members[k])
            self.pos[k] = 0
        v = int(self.order[k][self.pos[k]])
        self.pos[k] += 1
        return v

    def take(self, k: int, n: int) -> np.ndarray:
        """``n`` distinct members of pool ``k`` (``n`` <= the pool's size), int64[n]."""
        if n > self.members[k].size:
            raise ValueError(f"n: pool {k} holds {self.members[k].size} members, asked for {n}")
        order, pos = self.order[k], self.pos[k]
        if pos + n <= order.size:  # the common case: one slice
            self.pos[k] = pos + n
            return order[pos:pos + n].copy()
        out = order[pos:].tolist()
        taken = set(out)
        self.order[k] = order = self.rng.permutation(self.members[k])
        pos = 0
        while len(out) < n:  # across the epoch boundary: skip members already taken
            x = int(order[pos])
            pos += 1
            if x not in taken:
                out.append(x)
                taken.add(x)
        self.pos[k] = pos
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        """Orders and positions (JSON-able); the rng is saved by its owner."""
        return {"order": [o.tolist() for o in self.order], "pos": list(self.pos)}

    def load_state_dict(self, d: dict) -> None:
        order = [np.asarray(o, dtype=np.int64) for o in d["order"]]
        if len(order) != len(self.members) or any(o.size != m.size for o, m in zip(order, self.members)):
            raise ValueError(f"state_dict: pool sizes {[o.size for o in order]} do not match {self.sizes}")
        self.order = order
        self.pos = [int(p) for p in d["pos"]]


class MixedSampler:
    """Prompts with task ~ Categorical(p) and index from a :class:`PoolWalker`.

    Parameters
    ----------
    pool_sizes : sequence of int
        Prompts per task pool.
    seed : int
    """

    def __init__(self, pool_sizes: Sequence[int], seed: int):
        self.rng = np.random.default_rng(seed)
        self.walker = PoolWalker([int(s) for s in pool_sizes], self.rng)

    @property
    def pool_sizes(self) -> list[int]:
        return self.walker.sizes

    def draw(self, n: int, probs: Any, exclude: Iterable[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` (task, index) pairs, none in ``exclude`` and none twice.

        A repeat can only arise after a pool's reshuffle; the walker is asked at most four
        times per slot, then the slot is dropped (so a batch may come back short when a
        pool is smaller than the draw).
        """
        p = as_vector("probs", probs, len(self.walker.members))
        if np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"probs: expected non-negative task probabilities with a positive sum, got {p.tolist()}")
        p = p / p.sum()
        tasks = self.rng.choice(len(p), size=int(n), p=p)
        seen = set(exclude)
        t_out, i_out = [], []
        for k in tasks:
            for _ in range(4):
                idx = self.walker.next(int(k))
                if (int(k), idx) not in seen:
                    break
            else:
                continue
            seen.add((int(k), idx))
            t_out.append(int(k))
            i_out.append(idx)
        return np.asarray(t_out, dtype=np.int32), np.asarray(i_out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "walker": self.walker.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]
        self.walker.load_state_dict(d["walker"])


class DynamicSampling:
    """Sampling rounds without the ratio-preserving sampler, in the RP sampler's interface
    (``start_step`` / ``next_round`` / ``report`` / ``finish``): each round draws prompts
    with task probabilities z (:class:`~mtgrpo_core.pools.MixedSampler`); with the filter,
    ``ceil(oversample * B)`` prompts per round for up to ``max_rounds`` rounds, keeping the
    first B accepted (DAPO's dynamic sampling); without it, one round of exactly B."""

    @dataclass
    class Draw:
        task_ids: np.ndarray
        prompt_indices: np.ndarray

    @dataclass
    class Batch:
        task_ids: np.ndarray
        prompt_indices: np.ndarray
        targets: np.ndarray
        realized: np.ndarray
        shortfall: int

    def __init__(self, pool_sizes, batch_size: int, *, filtered: bool, oversample: float, max_rounds: int,
                 seed: int):
        self.mixed = MixedSampler(pool_sizes, seed=seed)
        self.K = len(pool_sizes)
        self.B = int(batch_size)
        self.rounds = int(max_rounds) if filtered else 1
        self.draw_n = int(math.ceil(oversample * self.B)) if filtered else self.B

    def start_step(self, weights) -> None:
        self.z = np.asarray(weights, np.float64)
        self.round = 0
        self.seen: set = set()
        self.kept: list = []

    def next_round(self) -> Draw | None:
        if self.round >= self.rounds or len(self.kept) >= self.B:
            return None
        self.round += 1
        t_ids, p_idx = self.mixed.draw(self.draw_n, self.z, exclude=self.seen)
        self.seen.update(zip(t_ids.tolist(), p_idx.tolist()))
        return self.Draw(t_ids, p_idx)

    def report(self, task_ids, prompt_indices, accepted) -> None:
        for j in np.nonzero(np.asarray(accepted))[0]:
            if len(self.kept) < self.B:
                self.kept.append((int(task_ids[j]), int(prompt_indices[j])))

    def finish(self) -> Batch:
        t = np.asarray([k for k, _ in self.kept], np.int64)
        i = np.asarray([x for _, x in self.kept], np.int64)
        realized = np.bincount(t, minlength=self.K).astype(np.int64)
        return self.Batch(t, i, self.z * self.B, realized, max(0, self.B - len(self.kept)))

    def state_dict(self) -> dict:
        return self.mixed.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.mixed.load_state_dict(d)
