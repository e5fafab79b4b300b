"""Prompt-GDRO: the data adversary over difficulty groups (docs/ALGORITHMS.md section 5.2;
Panaganti et al., arXiv 2601.19280).

What: per step, for each group b present, the mean per-response loss l_b (token-mean
clipped surrogate, no KL), optionally divided by the group's share of the batch's responses
(floored at ``share_floor``, default 1/num_groups, so a rare group's loss is amplified at
most num_groups-fold); EMA score S_b <- (1 - beta) S_b + beta l_b (first observation
initialises; never-observed groups keep S_b = 0). omega_b = exp(eta S_b) (computed as a
softmax of eta S, so it never overflows), q_b = (1 - gamma) omega_b / sum omega + gamma / G.

Realised by reweighting, not resampling: each response's advantage is multiplied by its
group's q, rescaled so the mean weight over the batch's responses is 1 and capped at
``cap`` (15); after capping the uncapped weights are scaled up again (iteratively) so the
mean stays exactly 1 (always possible when cap >= 1).

Theory: exponential weights solve the entropy-regularised inner maximisation over groups
(a soft worst-group objective) with no-regret guarantees.
Cost: O(N) bincount per call plus O(G^2) for the cap; about 20 microseconds at N = 4096.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import as_groups, as_mask, as_vector, check_float, check_int, check_positive_int, check_state
from ..weighting._common import GRAD_LIMIT, MAX_COEF, MAX_TASKS, softmax

__all__ = ["PromptGDRO"]


def capped_mean_one(values: np.ndarray, counts: np.ndarray, cap: float) -> np.ndarray:
    """Scale per-group ``values`` (>0) so that sum(counts * w) / sum(counts) == 1 with w <= cap.

    Water-filling: groups whose scaled value would exceed ``cap`` are pinned at ``cap`` and
    the rest rescaled, repeated until nothing new is pinned (at most G rounds). Requires
    cap >= 1 (then a solution always exists).
    """
    n = counts.sum()
    w = values * (n / np.dot(counts, values))
    pinned = np.zeros(values.shape, bool)
    for _ in range(values.size + 1):
        over = (w > cap) & ~pinned
        if not over.any():
            break
        pinned |= over
        free = ~pinned
        budget = n - cap * counts[pinned].sum()
        mass = np.dot(counts[free], values[free])
        w = np.where(pinned, cap, values * (budget / mass) if mass > 0 else cap)
    return np.minimum(w, cap)


class PromptGDRO:
    """Exponential-weights adversary over ``num_groups`` difficulty groups.

    Parameters
    ----------
    num_groups : int
        G (``DifficultyClassifier.num_groups``).
    eta : float >= 0
        Exponential-weights step (0.65).
    gamma : float in [0, 1]
        Uniform exploration mix (0.01).
    ema : float in (0, 1]
        beta of the EMA score (0.12).
    cap : float >= 1
        Maximum response weight after mean-1 normalisation (15).
    share_normalize : bool
        Divide each group's mean loss by its share of the batch (default True).
    share_floor : float or None
        Floor of that share (default 1 / num_groups).
    """

    kind = "PromptGDRO"

    def __init__(self, num_groups: int, eta: float = 0.65, gamma: float = 0.01, ema: float = 0.12,
                 cap: float = 15.0, share_normalize: bool = True, share_floor: float | None = None):
        self.num_groups = check_positive_int("num_groups", num_groups, 1, MAX_TASKS)
        self.eta = check_float("eta", eta, 0.0, MAX_COEF)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0)
        self.ema = check_float("ema", ema, 0.0, 1.0, lo_open=True)
        self.cap = check_float("cap", cap, 1.0, MAX_COEF)
        self.share_normalize = bool(share_normalize)
        self.share_floor = (1.0 / self.num_groups if share_floor is None
                            else check_float("share_floor", share_floor, 0.0, 1.0, lo_open=True))
        self.scores = np.zeros(self.num_groups)
        self.seen = np.zeros(self.num_groups, bool)
        self.steps = 0

    @property
    def distribution(self) -> np.ndarray:
        """q[G]: (1 - gamma) softmax(eta S) + gamma / G (float64, sums to 1)."""
        with np.errstate(over="ignore"):
            x = np.clip(self.eta * self.scores, -GRAD_LIMIT, GRAD_LIMIT)
        return (1.0 - self.gamma) * softmax(x) + self.gamma / self.num_groups

    def response_weights(self, groups_of_responses: Any) -> np.ndarray:
        """Per-response advantage multipliers (float64[N]): q of the response's group,
        scaled to mean 1 over the N responses and capped at ``cap``."""
        g = as_groups("groups_of_responses", groups_of_responses, self.num_groups)
        if g.size == 0:
            return np.zeros(0)
        counts = np.bincount(g, minlength=self.num_groups).astype(np.float64)
        present = counts > 0
        q = self.distribution
        w = np.zeros(self.num_groups)
        # q >= gamma / G > 0 unless gamma == 0 and a group underflowed; floor keeps the scale defined
        vals = np.maximum(q[present], 1e-300)
        w[present] = capped_mean_one(vals, counts[present], self.cap)
        return w[g]

    def update(self, groups_of_responses: Any, per_response_loss: Any) -> np.ndarray:
        """Fold one step's per-response losses into the scores; returns the new q."""
        g = as_groups("groups_of_responses", groups_of_responses, self.num_groups)
        loss = as_vector("per_response_loss", per_response_loss, g.shape[0])
        if g.size == 0:
            return self.distribution
        counts = np.bincount(g, minlength=self.num_groups).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            sums = np.bincount(g, weights=loss, minlength=self.num_groups)
            present = counts > 0
            lb = np.where(present, sums / np.maximum(counts, 1.0), 0.0)
            if self.share_normalize:
                lb = lb / np.maximum(counts / g.size, self.share_floor)
            lb = np.clip(np.nan_to_num(lb, nan=0.0), -GRAD_LIMIT, GRAD_LIMIT)
            ema = (1.0 - self.ema) * self.scores + self.ema * lb
        self.scores = np.where(present, np.where(self.seen, ema, lb), self.scores)
        self.seen |= present
        self.steps += 1
        return self.distribution

    def observe(self, groups: Any, per_response_loss: Any) -> np.ndarray:
        """Protocol form of :meth:`update` (:class:`~mtgrpo_core.gdro.protocol.AdvantageWeighting`)."""
        return self.update(groups, per_response_loss)

    def metrics(self) -> dict:
        """The adversary's distribution over groups (``gdro_q``)."""
        return {"gdro_q": self.distribution}

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_groups": self.num_groups, "eta": self.eta, "gamma": self.gamma,
                "ema": self.ema, "cap": self.cap, "share_normalize": self.share_normalize,
                "share_floor": self.share_floor, "scores": self.scores.tolist(), "seen": self.seen.tolist(),
                "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_groups=self.num_groups)
        for key in ("scores", "seen", "steps"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        # validate all, then assign: a bad state leaves the object unchanged
        scores = as_vector("state_dict['scores']", d["scores"], self.num_groups).copy()
        seen = as_mask("state_dict['seen']", d["seen"], self.num_groups).copy()
        steps = check_int("state_dict['steps']", d["steps"], 0)
        self.scores, self.seen, self.steps = scores, seen, steps
