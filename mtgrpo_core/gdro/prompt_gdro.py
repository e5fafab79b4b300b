"""Prompt-GDRO: the data adversary over difficulty groups (docs/ALGORITHMS.md section 5.2;
Panaganti et al., arXiv 2601.19280).

What: per step, for each group b present, the group's signal l_b, optionally divided by the
group's share of the batch's responses floored at ``share_floor``. The default floor is 1.0,
which means no amplification (issue 23). With floor 0.01 a rare group's signal was amplified
up to 100-fold, and at small batches (24 prompts over 11 groups) q collapsed onto a newly
populated bin of 2-3 prompts. That cost 6.2 pass@4 points against GRPO on cpu-3task
(bench/experiments/RESULTS-compare-gdro14.md). ``share_floor=1/G`` is the released code's
floor, and 0.01 is issue 14's. EMA score
S_b <- (1 - beta) S_b + beta l_b (first observation initialises; never-observed groups keep S_b =
0). omega_b = exp(eta S_b) (computed as a
softmax of eta S, so it never overflows), q_b = (1 - gamma) omega_b / sum omega + gamma / G.

The signal (``signal=``):

``"surrogate"`` (the paper's and the released code's)
    mean per-response loss, the token-mean clipped surrogate WITHOUT this adversary's own
    multipliers and without KL. Caveat (issue 14): before the update the ratio is 1, the
    surrogate is -A and GRPO advantages sum to 0 within a prompt's group, so its expectation
    is about 0 in every group: q stays near uniform or drifts to whichever group's noise
    is largest.
``"learnability"`` (this library's extension)
    the mean over the group's responses of their prompt's unbiased reward variance,
    s^2 = n/(n-1) pbar(1 - pbar) for 0/1 rewards, divided by its maximum (hi - lo)^2 / 4 so it
    lies in [0, 1]. It is the expected squared GRPO advantage signal: 0 for prompts always or
    never solved (no gradient), largest at pass rate 1/2, so q moves to the frontier.
``"failure"``
    mean (hi - r) / (hi - lo), the group's failure rate in [0, 1]: q leans to the hardest
    groups (including never-solved ones that carry no GRPO gradient).

The reward-based signals need ``rewards=`` (and, for learnability, ``prompt_of=``) in
:meth:`observe`; rewards must lie in ``reward_range`` (default (0, 1); (-1, 1) accepted).

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

from .._validate import (as_groups, as_mask, as_vector, check_choice, check_float, check_int, check_positive_int,
                         check_state)
from ..weighting._common import GRAD_LIMIT, MAX_COEF, MAX_TASKS, softmax

__all__ = ["PromptGDRO", "SIGNALS", "check_reward_range", "check_rewards_in_range"]

SIGNALS = ("surrogate", "learnability", "failure")


def check_reward_range(name: str, value: Any) -> tuple[float, float]:
    """A declared reward range (lo, hi) with finite lo < hi, e.g. (0, 1) or (-1, 1)."""
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (lo, hi) such as (0, 1) or (-1, 1), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{name}: expected finite lo < hi, got ({lo}, {hi})")
    return lo, hi


def check_rewards_in_range(name: str, values: Any, n: int | None, rng: tuple[float, float]) -> np.ndarray:
    """float64 rewards, all within the declared range ``rng`` (else ValueError, never a clip)."""
    r = as_vector(name, values, n)
    lo, hi = rng
    if r.size and (r.min() < lo or r.max() > hi):
        raise ValueError(f"{name}: expected rewards in the declared reward_range [{lo}, {hi}], got values in "
                         f"[{r.min()}, {r.max()}]; declare reward_range=(lo, hi) to match the reward")
    return r


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
        Floor of that share (default 1.0: no rare-group amplification; None means
        1 / num_groups, the released code's; 0.01 was issue 14's default).
    signal : {"surrogate", "learnability", "failure"}
        What the adversary maximises (module docstring); default "surrogate" (the paper's).
    reward_range : (lo, hi)
        Declared reward range for the reward-based signals: (0, 1) or (-1, 1) or any lo < hi.
    """

    kind = "PromptGDRO"

    def __init__(self, num_groups: int, eta: float = 0.65, gamma: float = 0.01, ema: float = 0.12,
                 cap: float = 15.0, share_normalize: bool = True, share_floor: float | None = 1.0,
                 signal: str = "surrogate", reward_range: tuple = (0.0, 1.0)):
        self.num_groups = check_positive_int("num_groups", num_groups, 1, MAX_TASKS)
        self.eta = check_float("eta", eta, 0.0, MAX_COEF)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0)
        self.ema = check_float("ema", ema, 0.0, 1.0, lo_open=True)
        self.cap = check_float("cap", cap, 1.0, MAX_COEF)
        self.share_normalize = bool(share_normalize)
        self.share_floor = (1.0 / self.num_groups if share_floor is None
                            else check_float("share_floor", share_floor, 0.0, 1.0, lo_open=True))
        self.signal = check_choice("signal", signal, SIGNALS)
        self.reward_range = check_reward_range("reward_range", reward_range)
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

    @property
    def needs_rewards(self) -> bool:
        """True when :meth:`observe` needs ``rewards=`` (the reward-based signals)."""
        return self.signal != "surrogate"

    def signal_values(self, groups_of_responses: Any, per_response_loss: Any = None, *, rewards: Any = None,
                      prompt_of: Any = None) -> np.ndarray:
        """Per-response signal (float64[N]) whose group means are l_b (module docstring).

        ``per_response_loss`` (the unweighted surrogate) is used by ``signal="surrogate"``;
        ``rewards`` [N] in ``reward_range`` by the others; ``prompt_of`` [N] (prompt index of
        each response) by "learnability" (without it all of a group's responses count as one
        prompt).
        """
        g = as_groups("groups_of_responses", groups_of_responses, self.num_groups)
        N = g.shape[0]
        if self.signal == "surrogate":
            if per_response_loss is None:
                raise ValueError("per_response_loss: signal='surrogate' needs the per-response loss")
            return as_vector("per_response_loss", per_response_loss, N)
        if rewards is None:
            raise ValueError(f"rewards: signal={self.signal!r} needs the per-response rewards")
        r = check_rewards_in_range("rewards", rewards, N, self.reward_range)
        lo, hi = self.reward_range
        if self.signal == "failure":
            return (hi - r) / (hi - lo)
        if prompt_of is None:
            seg = g.astype(np.int64)
        else:
            seg = as_groups("prompt_of", prompt_of, max(N, 1))
            if seg.shape[0] != N:
                raise ValueError(f"prompt_of: expected {N} prompt indices, got {seg.shape[0]}")
        m = int(seg.max()) + 1 if N else 0
        cnt = np.bincount(seg, minlength=m).astype(np.float64)
        mean = np.bincount(seg, weights=r, minlength=m) / np.maximum(cnt, 1.0)
        ss = np.bincount(seg, weights=(r - mean[seg]) ** 2, minlength=m)
        # unbiased variance; a single rollout carries no GRPO signal (its advantage is 0)
        var = np.where(cnt > 1, ss / np.maximum(cnt - 1.0, 1.0), 0.0)
        return np.clip(var[seg] / ((hi - lo) ** 2 / 4.0), 0.0, 1.0)

    def update(self, groups_of_responses: Any, per_response_loss: Any = None, *, rewards: Any = None,
               prompt_of: Any = None) -> np.ndarray:
        """Fold one step in; returns the new q.

        Parameters
        ----------
        groups_of_responses : int[N]
            Difficulty group of each response.
        per_response_loss : float[N] or None
            The UNWEIGHTED per-response clipped surrogate (signal "surrogate"); never a loss
            that already includes this adversary's multipliers (that feeds q back into
            itself and locks it onto an arbitrary group).
        rewards : float[N] or None
            Per-response rewards in ``reward_range`` (signals "learnability", "failure").
        prompt_of : int[N] or None
            Prompt index of each response ("learnability").
        """
        g = as_groups("groups_of_responses", groups_of_responses, self.num_groups)
        loss = self.signal_values(g, per_response_loss, rewards=rewards, prompt_of=prompt_of)
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

    def observe(self, groups: Any, per_response_loss: Any = None, *, rewards: Any = None,
                prompt_of: Any = None) -> np.ndarray:
        """Protocol form of :meth:`update` (:class:`~mtgrpo_core.gdro.protocol.AdvantageWeighting`)."""
        return self.update(groups, per_response_loss, rewards=rewards, prompt_of=prompt_of)

    def metrics(self) -> dict:
        """The adversary's distribution over groups (``gdro_q``)."""
        return {"gdro_q": self.distribution}

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_groups": self.num_groups, "eta": self.eta, "gamma": self.gamma,
                "ema": self.ema, "cap": self.cap, "share_normalize": self.share_normalize,
                "share_floor": self.share_floor, "signal": self.signal,
                "reward_range": list(self.reward_range), "scores": self.scores.tolist(), "seen": self.seen.tolist(),
                "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_groups=self.num_groups)
        if d.get("signal", "surrogate") != self.signal:   # states before issue 14 had only the surrogate
            raise ValueError(f"state_dict: signal {d.get('signal', 'surrogate')!r} does not match {self.signal!r}")
        for key in ("scores", "seen", "steps"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        # validate all, then assign: a bad state leaves the object unchanged
        scores = as_vector("state_dict['scores']", d["scores"], self.num_groups).copy()
        seen = as_mask("state_dict['seen']", d["seen"], self.num_groups).copy()
        steps = check_int("state_dict['steps']", d["steps"], 0)
        self.scores, self.seen, self.steps = scores, seen, steps
