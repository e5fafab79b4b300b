"""Rollout-GDRO: the compute adversary that chooses rollouts per prompt (docs/ALGORITHMS.md section 5.3;
Panaganti et al., arXiv 2601.19280).

Each prompt of group b gets n in [n_min, n_max] rollouts (default [2, 12]); the total over
the batch's P prompts is exactly T = n_mean * P whenever that is an integer in
[P n_min, P n_max] (compute-neutral), otherwise round(T) clipped to the feasible range.

``method="sqrt"`` (the paper's Thm 4.2 optimum): v_b = max(p_b (1 - p_b), var_floor) with
p_b an EMA (``ema``) of group b's mean reward mapped to [0, 1] from the declared
``reward_range`` (default (0, 1); (-1, 1), the released code's reward, maps by (r + 1) / 2;
a reward outside the declared range raises: clipping +-1 rewards to [0, 1] silently cost
+10% WSE) (v_b = 1/4 before the first observation); n_b* = c sqrt(v_b) clipped to the
bounds, with c found exactly (water-filling over the breakpoints) so the clipped targets sum to T.
Without clipping this is
n_b* = n_mean sqrt(v_b) / sum_j q_j sqrt(v_j), q_j the share of prompts in group j. Integer
rounding by largest remainder within the bounds, then an exact greedy repair of the total.

``method="bandit"`` (the paper's online method): per group, exponential weights over the arms
n in [n_min, n_max], p_b(n) = (1 - gamma) softmax(eta (J_b(n) - mu n)) + gamma / A, i.e. arm
loss -J_b(n) + mu n (the paper's sign; the reference code flips it). J_b(n) is the share of
group b's prompts whose n rollouts gave an informative group (rewards not all equal, so a
non-zero GRPO advantage), an EMA per (group, arm) with rate ``arm_lr``; arms never tried
start at the optimistic 1. With ``draw=True`` (default) each prompt's n is DRAWN from its
group's p_b, then repaired to the exact total T by moving single prompts one arm at a time
where that costs the least log-probability (an exponential-weights learner must play its
distribution: the joint mode below locks each group on one arm and never explores the
others). With ``draw=False`` the joint allocation maximises the prompts' joint log-probability
sum_b count_b log p_b(n_b) subject to sum_b count_b n_b = T, by dynamic programming over
groups (per prompt +-1 repair when no per-group choice hits T exactly). The shadow price is
dual ascent on the budget: mu <- max(0, mu + mu_lr (demand - n_mean)), where demand is the
mean rollouts per prompt the arms would pick on their own (E_{p_b}[n], weighted by the
realised batch's groups). The reference code updates mu from the budget-matched plan, so mu
never moves, and keeps the arm state it needs in a buffer that the next allocation
overwrites; here ``update`` takes everything it needs as arguments.

Diagnostic: :func:`weighted_standard_error` WSE = sum_b q_b sigma_b / sqrt(n_b).
Cost: sqrt O(P + B^2); bandit O(B A T') for the DP with T' = P (n_mean - n_min) states
(about 0.2 ms at P = 512, B = 11, A = 11).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..weighting._common import (GRAD_LIMIT, MAX_COEF, MAX_ROLLOUTS, MAX_TASKS, as_mask, as_vector, check_choice,
                                 check_float, check_int, check_positive_int, check_state)
from .._validate import as_groups
from .prompt_gdro import check_reward_range, check_rewards_in_range

__all__ = ["RolloutAllocator", "weighted_standard_error"]


def weighted_standard_error(q: Any, sigma: Any, n: Any) -> float:
    """WSE = sum_b q_b sigma_b / sqrt(n_b) (float); q >= 0, sigma >= 0, n > 0, same lengths."""
    q = as_vector("q", q)
    sigma = as_vector("sigma", sigma, q.shape[0])
    n = as_vector("n", n, q.shape[0])
    if np.any(q < 0):
        raise ValueError("q: expected non-negative shares")
    if np.any(sigma < 0):
        raise ValueError("sigma: expected non-negative standard deviations")
    if np.any(n <= 0):
        raise ValueError("n: expected positive rollout counts")
    return float(np.sum(q * sigma / np.sqrt(n)))


def _round_to_total(x: np.ndarray, total: int, lo, hi, priority: np.ndarray | None = None) -> np.ndarray:
    """Integers n_i in [lo_i, hi_i] with sum exactly ``total`` (sum lo <= total <= sum hi), close to x.

    Largest remainder on floor(x); then a greedy fix (add where x - n is largest, remove where
    it is smallest) that also absorbs floating-point drift. Ties break by index (stable).
    ``lo`` / ``hi`` are scalars or arrays like ``x``.
    """
    lo = np.broadcast_to(np.asarray(lo, np.int64), x.shape)
    hi = np.broadcast_to(np.asarray(hi, np.int64), x.shape)
    x = np.clip(x, lo, hi)
    n = np.floor(x).astype(np.int64)
    diff = int(total - n.sum())
    if diff > 0:
        room = np.flatnonzero(n < hi)
        key = (x - n)[room] if priority is None else priority[room]
        order = room[np.argsort(-key, kind="stable")]
        while diff > 0 and order.size:  # one pass suffices unless x drifted
            take = order[: diff]
            n[take] += 1
            diff -= take.size
            order = order[n[order] < hi[order]]
    elif diff < 0:
        room = np.flatnonzero(n > lo)
        key = (x - n)[room] if priority is None else -priority[room]
        order = room[np.argsort(key, kind="stable")]
        while diff < 0 and order.size:
            take = order[: -diff]
            n[take] -= 1
            diff += take.size
            order = order[n[order] > lo[order]]
    return n


def _split_group_totals(g: np.ndarray, counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Per-prompt counts: group b's ``totals[b]`` split floor/ceil over its prompts (the
    first ``totals % counts`` prompts of the group, in batch order, get one more)."""
    base = totals // np.maximum(counts, 1)
    extra = totals - base * counts
    order = np.argsort(g, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(g.size, np.int64)
    rank[order] = np.arange(g.size) - starts[g[order]]
    return base[g] + (rank < extra[g])


class RolloutAllocator:
    """Rollouts per prompt by difficulty group, at an exact mean budget.

    Parameters
    ----------
    num_groups : int
        G (``DifficultyClassifier.num_groups``).
    n_min, n_max : int
        Bounds on rollouts per prompt (2, 12).
    n_mean : float
        Mean budget per prompt (4), n_min <= n_mean <= n_max.
    method : {"sqrt", "bandit"}
    mu_lr : float
        Shadow-price step (0.05).
    eta, gamma : float
        Exponential-weights step and exploration of the arm bandits (0.65, 0.01).
    var_floor : float
        Floor of v_b = p_b (1 - p_b) (0.01).
    ema : float
        EMA rate of p_b (0.1); the first observation initialises.
    arm_lr : float
        EMA rate of J_b(n) (0.3); the first observation initialises.
    reward_range : (lo, hi)
        Declared reward range (default (0, 1); (-1, 1) accepted); rewards outside raise.
    draw : bool
        Bandit only: draw each prompt's arm from p_b (True, default) or take the joint mode.
    seed : int
        Seed of the bandit's arm draws.
    """

    kind = "RolloutAllocator"

    def __init__(self, num_groups: int, n_min: int = 2, n_max: int = 12, n_mean: float = 4, method: str = "sqrt",
                 mu_lr: float = 0.05, eta: float = 0.65, gamma: float = 0.01, var_floor: float = 0.01,
                 ema: float = 0.1, arm_lr: float = 0.3, reward_range: tuple = (0.0, 1.0), draw: bool = True,
                 seed: int = 0):
        self.num_groups = check_positive_int("num_groups", num_groups, 1, MAX_TASKS)
        self.n_min = check_positive_int("n_min", n_min, 1, MAX_ROLLOUTS)
        self.n_max = check_positive_int("n_max", n_max, 1, MAX_ROLLOUTS)
        if self.n_max < self.n_min:
            raise ValueError(f"n_max: expected >= n_min = {self.n_min}, got {self.n_max}")
        self.n_mean = check_float("n_mean", n_mean, self.n_min, self.n_max)
        self.method = check_choice("method", method, ("sqrt", "bandit"))
        self.mu_lr = check_float("mu_lr", mu_lr, 0.0, MAX_COEF)
        self.eta = check_float("eta", eta, 0.0, MAX_COEF)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0)
        self.var_floor = check_float("var_floor", var_floor, 0.0, 0.25, lo_open=True)
        self.ema = check_float("ema", ema, 0.0, 1.0, lo_open=True)
        self.arm_lr = check_float("arm_lr", arm_lr, 0.0, 1.0, lo_open=True)
        self.reward_range = check_reward_range("reward_range", reward_range)
        self.draw = bool(draw)
        self.seed = check_int("seed", seed, 0)
        self.rng = np.random.default_rng(self.seed)
        self.arms = np.arange(self.n_min, self.n_max + 1)
        A = self.arms.size
        self.p = np.zeros(self.num_groups)              # EMA of mean reward per group
        self.p_seen = np.zeros(self.num_groups, bool)
        self.arm_value = np.ones((self.num_groups, A))  # J_b(n), optimistic start
        self.arm_seen = np.zeros((self.num_groups, A), bool)
        self.mu = 0.0
        self.steps = 0
        self.last_demand = float("nan")

    # -- quantities ----------------------------------------------------------------------
    def variances(self) -> np.ndarray:
        """v_b (float64[G]): max(p_b (1 - p_b), var_floor); 1/4 for groups never observed."""
        v = np.maximum(self.p * (1.0 - self.p), self.var_floor)
        return np.where(self.p_seen, v, 0.25)

    def arm_probs(self) -> np.ndarray:
        """p_b(n) (float64[G, A]) over arms ``self.arms`` for every group."""
        with np.errstate(over="ignore"):
            x = np.clip(self.eta * (self.arm_value - self.mu * self.arms[None, :]), -GRAD_LIMIT, GRAD_LIMIT)
        x = x - x.max(axis=1, keepdims=True)
        e = np.exp(x)
        sm = e / e.sum(axis=1, keepdims=True)
        return (1.0 - self.gamma) * sm + self.gamma / self.arms.size

    def budget(self, num_prompts: int) -> int:
        """The exact total rollouts for ``num_prompts`` prompts."""
        t = int(round(self.n_mean * num_prompts))
        return min(max(t, self.n_min * num_prompts), self.n_max * num_prompts)

    # -- allocation ----------------------------------------------------------------------
    def allocate(self, groups_of_prompts: Any) -> np.ndarray:
        """Rollouts per prompt (int64[P]), each in [n_min, n_max], sum == ``budget(P)``."""
        g = as_groups("groups_of_prompts", groups_of_prompts, self.num_groups)
        P = g.size
        if P == 0:
            return np.zeros(0, np.int64)
        T = self.budget(P)
        counts = np.bincount(g, minlength=self.num_groups)
        if self.method == "sqrt":
            target = self._sqrt_targets(counts, T)
            # round the groups' totals (|total_b - count_b n_b*| < 1), then split each
            # group's total floor/ceil over its prompts
            totals = _round_to_total(counts * target, T, counts * self.n_min, counts * self.n_max)
            return _split_group_totals(g, counts, totals)
        lp = np.log(self.arm_probs())
        A = self.arms.size
        if self.draw:
            # inverse-CDF draw of each prompt's arm from its group's p_b
            cdf = np.cumsum(np.exp(lp[g]), axis=1)
            u = self.rng.random(P)[:, None] * cdf[:, -1:]
            idx = np.minimum((u > cdf).sum(axis=1), A - 1)
            n0 = self.arms[idx]
            if int(n0.sum()) == T:
                return n0.astype(np.int64)
            x = n0.astype(np.float64)
            below = int(n0.sum()) < T
        else:
            per_group = self._bandit_plan(counts, T)
            x = per_group[g].astype(np.float64)
            if int((counts * per_group).sum()) == T:
                return per_group[g].astype(np.int64)
            idx = per_group[g] - self.n_min
            below = int((counts * per_group).sum()) < T
        # no choice hits T: move single prompts by one arm, preferring the moves that cost the
        # least log-probability (priority = log p(n +- 1) - log p(n)); x is integral, so the
        # largest-remainder step is a no-op and the greedy repair alone sets the total
        if below:
            prio = np.where(idx + 1 < A, lp[g, np.minimum(idx + 1, A - 1)] - lp[g, idx], -np.inf)
        else:  # _round_to_total removes first where the priority is largest
            prio = np.where(idx > 0, lp[g, np.maximum(idx - 1, 0)] - lp[g, idx], -np.inf)
        return _round_to_total(x, T, self.n_min, self.n_max, priority=prio)

    def _sqrt_targets(self, counts: np.ndarray, T: int) -> np.ndarray:
        """Real targets n_b = clip(c sqrt(v_b), n_min, n_max) with sum_b count_b n_b == T."""
        s = np.sqrt(self.variances())
        present = counts > 0
        cnt, sp = counts[present].astype(np.float64), s[present]
        lo, hi = float(self.n_min), float(self.n_max)

        def f(c):  # total as a function of the scale (non-decreasing, piecewise linear)
            return np.sum(cnt * np.clip(np.multiply.outer(np.atleast_1d(c), sp), lo, hi), axis=-1)

        bps = np.unique(np.concatenate([lo / sp, hi / sp]))
        vals = f(bps)
        k = int(np.searchsorted(vals, T, side="left"))
        if k == 0:
            c = bps[0]
        elif k >= bps.size:
            c = bps[-1]
        else:  # linear between bps[k-1] and bps[k]
            c0, c1, f0, f1 = bps[k - 1], bps[k], vals[k - 1], vals[k]
            c = c1 if f1 == f0 else c0 + (T - f0) * (c1 - c0) / (f1 - f0)
        out = np.full(self.num_groups, float(self.n_mean))
        out[present] = np.clip(c * sp, lo, hi)
        return out

    def _bandit_plan(self, counts: np.ndarray, T: int) -> np.ndarray:
        """Per-group arm maximising sum_b count_b log p_b(n_b) with total exactly T when
        reachable (else as close as reachable), by DP over the excess over n_min.

        Forward pass: value tables V_j[s] (best objective of the first j groups with excess
        s), one shifted ``np.maximum`` per (group, arm); the backward pass recovers the arm
        of each group at the chosen state (the smallest arm attaining the value, so ties
        break deterministically). First only states <= E are kept (enough when T is
        reachable); a second pass with room to overshoot runs only when it is not.
        """
        lp = np.log(self.arm_probs())
        present = np.flatnonzero(counts > 0)
        A = self.arms.size
        E = T - self.n_min * int(counts.sum())          # excess over the all-n_min allocation
        full = int(counts.sum()) * (A - 1) + 1
        for S in (min(E + 1, full), min(E + int(counts.max()) * (A - 1) + 1, full)):
            tables = []
            dp = np.full(S, -np.inf)
            dp[0] = 0.0
            for b in present:
                c = int(counts[b])
                new = dp + c * lp[b, 0]
                for k in range(1, A):
                    sh = c * k
                    if sh >= S:
                        break
                    np.maximum(new[sh:], dp[: S - sh] + c * lp[b, k], out=new[sh:])
                tables.append(dp)
                dp = new
            if np.isfinite(dp[E]) if E < S else False:
                best = E
                break
        else:
            reach = np.flatnonzero(np.isfinite(dp))
            dist = np.abs(reach - E)
            cand = reach[dist == dist.min()]
            best = int(cand[np.argmax(dp[cand])])
        plan = np.full(self.num_groups, int(round(self.n_mean)), np.int64)
        s = int(best)
        for j in range(present.size - 1, -1, -1):
            b = present[j]
            c = int(counts[b])
            prev = tables[j]
            target = dp[s]
            for k in range(A):
                if c * k <= s and prev[s - c * k] + c * lp[b, k] == target:
                    break
            plan[b] = self.n_min + k
            s -= c * k
            dp = prev
        return plan

    # -- update --------------------------------------------------------------------------
    def update(self, groups_of_prompts: Any, n: Any, rewards_per_prompt: Any) -> None:
        """Fold one step's outcome in.

        Parameters
        ----------
        groups_of_prompts : int[P]
            Group of each prompt (as passed to ``allocate``).
        n : int[P]
            Rollouts each prompt actually got (the realised allocation).
        rewards_per_prompt : list of P float arrays (lengths n) or one flat float[sum(n)] array
            The prompts' rewards in prompt order.
        """
        g = as_groups("groups_of_prompts", groups_of_prompts, self.num_groups)
        P = g.size
        nn = np.asarray(n)
        if nn.ndim != 1 or nn.shape[0] != P or (P and not np.issubdtype(nn.dtype, np.integer)):
            raise ValueError(f"n: expected an integer array of length {P}, got dtype {nn.dtype} shape {nn.shape}")
        if P and (nn.min() < 1):
            raise ValueError(f"n: expected rollout counts >= 1, got min {nn.min()}")
        if P == 0:
            return
        if isinstance(rewards_per_prompt, np.ndarray) and rewards_per_prompt.ndim == 1 \
                and rewards_per_prompt.dtype != object:
            flat = check_rewards_in_range("rewards_per_prompt", rewards_per_prompt, int(nn.sum()), self.reward_range)
        else:
            if not isinstance(rewards_per_prompt, Sequence) and not isinstance(rewards_per_prompt, np.ndarray):
                raise ValueError("rewards_per_prompt: expected a list of arrays or a flat array")
            if len(rewards_per_prompt) != P:
                raise ValueError(f"rewards_per_prompt: expected {P} arrays, got {len(rewards_per_prompt)}")
            lens = np.fromiter((len(r) for r in rewards_per_prompt), np.int64, P)
            if not np.array_equal(lens, nn):
                bad = int(np.flatnonzero(lens != nn)[0])
                raise ValueError(f"rewards_per_prompt: prompt {bad} has {lens[bad]} rewards, n says {nn[bad]}")
            flat = check_rewards_in_range("rewards_per_prompt", np.concatenate(
                [np.asarray(r, np.float64).ravel() for r in rewards_per_prompt]), None, self.reward_range)
        starts = np.concatenate([[0], np.cumsum(nn)[:-1]])
        mean_r = np.add.reduceat(flat, starts) / nn
        informative = (np.maximum.reduceat(flat, starts) > np.minimum.reduceat(flat, starts)).astype(np.float64)
        counts = np.bincount(g, minlength=self.num_groups).astype(np.float64)
        present = counts > 0
        # reward level per group (sqrt allocator's variance proxy)
        lo, hi = self.reward_range
        pm = (np.bincount(g, weights=mean_r, minlength=self.num_groups) / np.maximum(counts, 1) - lo) / (hi - lo)
        pm = np.clip(pm, 0.0, 1.0)   # rounding only: the rewards were checked against the range
        upd = (1.0 - self.ema) * self.p + self.ema * pm
        self.p = np.where(present, np.where(self.p_seen, upd, pm), self.p)
        self.p_seen |= present
        if self.method == "bandit":
            # price first, from the arms' own demand on this batch (before the arms move)
            probs = self.arm_probs()
            demand = float(np.dot(counts, probs @ self.arms) / P)
            self.last_demand = demand
            self.mu = max(0.0, self.mu + self.mu_lr * (demand - self.n_mean))
            # arm values J_b(n) for the (group, n) pairs realised
            inside = (nn >= self.n_min) & (nn <= self.n_max)
            cell = g[inside] * self.arms.size + (nn[inside] - self.n_min)
            size = self.num_groups * self.arms.size
            cc = np.bincount(cell, minlength=size).astype(np.float64)
            js = np.bincount(cell, weights=informative[inside], minlength=size)
            obs = cc > 0
            jm = np.where(obs, js / np.maximum(cc, 1), 0.0).reshape(self.num_groups, -1)
            obs = obs.reshape(self.num_groups, -1)
            val = (1.0 - self.arm_lr) * self.arm_value + self.arm_lr * jm
            self.arm_value = np.where(obs, np.where(self.arm_seen, val, jm), self.arm_value)
            self.arm_seen |= obs
        self.steps += 1

    def observe(self, groups_of_prompts: Any, n: Any, rewards_per_prompt: Any) -> None:
        """Protocol form of :meth:`update` (:class:`~mtgrpo_core.gdro.protocol.RolloutAllocation`)."""
        self.update(groups_of_prompts, n, rewards_per_prompt)

    def metrics(self) -> dict:
        return {}

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"type": self.kind, "num_groups": self.num_groups, "n_min": self.n_min, "n_max": self.n_max,
                "n_mean": self.n_mean, "method": self.method, "mu_lr": self.mu_lr, "eta": self.eta,
                "gamma": self.gamma, "var_floor": self.var_floor, "ema": self.ema, "arm_lr": self.arm_lr,
                "p": self.p.tolist(), "p_seen": self.p_seen.tolist(), "arm_value": self.arm_value.tolist(),
                "arm_seen": self.arm_seen.tolist(), "mu": self.mu, "steps": self.steps,
                "reward_range": list(self.reward_range), "draw": self.draw,
                "rng": self.rng.bit_generator.state,
                "last_demand": None if np.isnan(self.last_demand) else self.last_demand}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_groups=self.num_groups, n_min=self.n_min, n_max=self.n_max,
                    method=self.method)
        G, A = self.num_groups, self.arms.size
        for key in ("n_mean", "p", "p_seen", "arm_value", "arm_seen", "mu", "steps"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        # validate everything first: a bad state leaves the allocator unchanged
        n_mean = check_float("state_dict['n_mean']", d["n_mean"], self.n_min, self.n_max)
        p = as_vector("state_dict['p']", d["p"], G).copy()
        if np.any((p < 0) | (p > 1)):
            raise ValueError(f"state_dict['p']: expected mean rewards in [0, 1], got {p.tolist()[:8]}")
        p_seen = as_mask("state_dict['p_seen']", d["p_seen"], G).copy()
        try:
            av = np.asarray(d["arm_value"], np.float64)
            seen = np.asarray(d["arm_seen"])
        except (TypeError, ValueError):
            raise ValueError("state_dict['arm_value'/'arm_seen']: expected numeric arrays") from None
        if av.shape != (G, A) or not np.all(np.isfinite(av)):
            raise ValueError(f"state_dict: arm_value must be finite with shape {(G, A)}")
        if seen.shape != (G, A) or not np.all(np.isin(seen, (0, 1))):
            raise ValueError(f"state_dict: arm_seen must be booleans with shape {(G, A)}")
        mu = check_float("state_dict['mu']", d["mu"], 0.0, MAX_COEF * self.n_max)
        steps = check_int("state_dict['steps']", d["steps"], 0)
        ld = d.get("last_demand")
        last = float("nan") if ld is None else check_float("state_dict['last_demand']", ld)
        self.n_mean, self.p, self.p_seen, self.arm_value = n_mean, p, p_seen, av.copy()
        rng = None
        if d.get("rng") is not None:   # states before issue 14 had no arm draws
            rng = np.random.default_rng()
            try:
                rng.bit_generator.state = d["rng"]
            except (TypeError, ValueError, KeyError):
                raise ValueError("state_dict['rng']: expected a numpy PCG64 bit-generator state") from None
        self.arm_seen, self.mu, self.steps, self.last_demand = seen.astype(bool), mu, steps, last
        if rng is not None:
            self.rng = rng
