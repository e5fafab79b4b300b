"""Task weighting controllers for multi-task GRPO (MT-GRPO and baselines).

What: task weights z on the simplex, z = softmax(xi), updated once per optimiser mini-batch
from per-task rewards J_k and improvements I_k. The weights feed the ratio-preserving
sampler (the batch holds task k in proportion z_k) and/or a task-weighted loss.

Algorithms (docs/ALGORITHMS.md sections 3-4; MT-GRPO, Ramesh et al., arXiv 2602.05547):
- :class:`ImprovementAwareWeights` (IWU, the method): s_k = clip(I_k) + lambda J_k (the
  clip scaled by policy_lr / 1e-6 when the policy lr is given),
  g_k = z_k (s_k - sum_j z_j s_j), xi <- xi - step(g) with Adam (betas 0.9/0.999, L2
  weight decay added to the gradient, as the reference code) or plain gradient descent.
  A descent step: a task with low reward and low improvement gains weight.
- :class:`RegularizedWeights` (Subroutine 2, ablation): s = 0.2 J, g_k = z_k (s_k - z.s);
  sgd: xi <- xi - beta (g + eta xi); adam: eta is Adam's L2 weight decay.
  eta -> 0 is the strict worst-task update that collapses onto one task.
- :class:`UniformWeights`: z = 1/K always.
- :class:`SECCurriculum` (Self-Evolving Curriculum, Chen et al., arXiv 2505.14970): a
  bandit over tasks rewarded by the mean |advantage| of each task's samples, TD(0) value
  update Q <- Q + lr (r - Q) (an absent task's reward is 0, or its arm frozen),
  Boltzmann probabilities softmax(Q / temperature) as the weights.
- :class:`TaskRewardTracker`: the EMA (decay 0.5) of per-task accuracy J_k over
  generation rounds, for the tasks present; starts at 0 (or at the first observation).

Cost: O(K) float64 work per update (a few microseconds at K = 9).
Numerics: softmax through log-sum-exp; gradients clipped at 1e100 and logits at 1e150,
so weights stay finite and on the simplex for any finite input.
State: ``state_dict()`` returns JSON-able dicts (lists of Python floats), which
``load_state_dict`` restores bit-exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (GRAD_LIMIT, LOGIT_LIMIT, MAX_COEF, MAX_LR, MAX_TASKS, MAX_WEIGHT_DECAY, Adam, as_mask, as_vector,
                      check_choice, check_float, check_int, check_logits, check_positive_int, check_state, softmax)
from .protocol import TaskStats

__all__ = ["ImprovementAwareWeights", "RegularizedWeights", "UniformWeights", "SECCurriculum",
           "TaskRewardTracker"]


class _LogitWeights:
    """Common machinery: logits xi, z = softmax(xi), one gradient step per update."""

    kind = "base"

    def __init__(self, num_tasks: int, lr: float, weight_decay: float, optimizer: str):
        self.num_tasks = check_positive_int("num_tasks", num_tasks, 1, MAX_TASKS)
        # bounded so that no update can overflow into NaN weights (see _common.MAX_LR)
        self.lr = check_float("lr", lr, 0.0, MAX_LR, lo_open=True)
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0, MAX_WEIGHT_DECAY)
        self.optimizer = check_choice("optimizer", optimizer, ("adam", "sgd"))
        self.xi = np.zeros(self.num_tasks)
        self._adam = Adam(self.num_tasks, self.lr, (0.9, 0.999), self.weight_decay)
        self.steps = 0

    @property
    def weights(self) -> np.ndarray:
        """Current task weights z[K] (float64, non-negative, sums to 1)."""
        return softmax(self.xi)

    def _step(self, s: np.ndarray) -> np.ndarray:
        z = softmax(self.xi)
        g = z * (s - np.dot(z, s))
        g = np.clip(g, -GRAD_LIMIT, GRAD_LIMIT)
        if self.optimizer == "adam":
            xi = self._adam.step(self.xi, g)
        else:
            xi = self.xi - self.lr * (g + self.weight_decay * self.xi)
        self.xi = np.clip(xi, -LOGIT_LIMIT, LOGIT_LIMIT)
        self.steps += 1
        return softmax(self.xi)

    def _hparams(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "optimizer": self.optimizer}

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_tasks": self.num_tasks, **self._hparams(),
                "xi": self.xi.tolist(), "steps": self.steps, "adam": self._adam.state()}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_tasks=self.num_tasks)
        for key in ("xi", "steps", "adam"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        # validate everything before assigning, so a bad state leaves the object unchanged
        xi = check_logits("state_dict['xi']", d["xi"], self.num_tasks).copy()
        steps = check_int("state_dict['steps']", d["steps"], 0)
        adam = Adam(self.num_tasks, self.lr, (0.9, 0.999), self.weight_decay)
        adam.load(d["adam"])
        self.xi, self.steps, self._adam = xi, steps, adam


class ImprovementAwareWeights(_LogitWeights):
    """MT-GRPO improvement-aware weight update (IWU).

    Parameters
    ----------
    num_tasks : int
        K.
    lam : float
        lambda >= 0 in s_k = I_k + lambda J_k; large -> worst-task, small -> balanced.
        Paper values: 0.2 / 0.25 (3 tasks), 0.1 ... 1.2 (9 tasks).
    lr : float
        Step size (Adam lr or SGD beta), default 0.025.
    weight_decay : float
        L2 decay added to the gradient: 1e-5 (3 tasks) / 1e-4 (9 tasks).
    optimizer : {"adam", "sgd"}
    improvement_clip : float
        c: I_k is clipped to [-C, C] with C = c (0.1; 0.2 in the 9-task runs), or, given
        ``policy_lr``, C = c * policy_lr / 1e-6.
    policy_lr : float or None
        The policy optimiser's learning rate. The released MT-GRPO code scales the clip by
        lr / 1e-6 (its runs use lr = 1e-6, where C = c): I_k is a loss difference after one
        optimiser step, so it grows roughly in proportion to the lr; at lr = 3e-4 an unscaled
        clip of 0.1 bound on 77% of (step, task) pairs of the CPU default run and reduced I_k
        to its sign. None: C = c (no scaling).
    """

    kind = "ImprovementAwareWeights"
    needs_improvement = True   # s_k = I_k + lambda J_k: the caller measures I_k per mini-batch

    #: the policy lr at which the clip equals ``improvement_clip`` (the released runs' lr)
    CLIP_REFERENCE_LR = 1e-6

    def __init__(self, num_tasks: int, lam: float = 0.2, lr: float = 0.025, weight_decay: float = 1e-5,
                 optimizer: str = "adam", improvement_clip: float = 0.1, policy_lr: float | None = None):
        super().__init__(num_tasks, lr, weight_decay, optimizer)
        self.lam = check_float("lam", lam, 0.0, MAX_COEF)
        self.improvement_clip = check_float("improvement_clip", improvement_clip, 0.0, MAX_COEF, lo_open=True)
        # policy lr <= 1 (any real optimiser's), so the effective clip stays <= c * 1e6 (finite)
        self.policy_lr = None if policy_lr is None else check_float("policy_lr", policy_lr, 0.0, 1.0, lo_open=True)

    @property
    def effective_clip(self) -> float:
        """The bound C on |I_k|: ``improvement_clip`` (* ``policy_lr`` / 1e-6 when given)."""
        if self.policy_lr is None:
            return self.improvement_clip
        return self.improvement_clip * self.policy_lr / self.CLIP_REFERENCE_LR

    def update(self, rewards: Any, improvements: Any = None) -> np.ndarray:
        """One IWU step.

        Parameters
        ----------
        rewards : array-like float[K]
            J_k, the (EMA-smoothed) per-task accuracy.
        improvements : array-like float[K] or None
            I_k = -(sum of task k's per-response loss after the optimiser step - before);
            0 for tasks absent from the update; None means all zero.

        Returns
        -------
        np.ndarray float64[K]: the new weights z.
        """
        J = as_vector("rewards", rewards, self.num_tasks)
        I = as_vector("improvements", improvements, self.num_tasks, allow_none=True)
        c = self.effective_clip
        I = np.zeros(self.num_tasks) if I is None else np.clip(I, -c, c)
        with np.errstate(over="ignore"):
            s = I + self.lam * J
        s = np.clip(s, -GRAD_LIMIT, GRAD_LIMIT)
        return self._step(s)

    def observe(self, stats: TaskStats) -> np.ndarray:
        """Protocol form of :meth:`update`: J = ``stats.rewards``, I = ``stats.improvements``."""
        return self.update(stats.rewards, stats.improvements)

    def _hparams(self) -> dict:
        return {**super()._hparams(), "lam": self.lam, "improvement_clip": self.improvement_clip,
                "policy_lr": self.policy_lr}


class RegularizedWeights(_LogitWeights):
    """Regularised reward-only update (MT-GRPO Subroutine 2, the ablation).

    s_k = reward_scale * J_k, g_k = z_k (s_k - z.s).
    ``optimizer="sgd"``: xi <- xi - lr (g + eta xi) (the paper's formula);
    ``optimizer="adam"`` (default, the reference code): Adam with eta as L2 weight decay.
    ``improvements`` is accepted for a uniform interface and ignored.

    Parameters
    ----------
    num_tasks : int
    lr : float
        Adam lr / SGD step (0.025).
    eta : float
        The regulariser (Adam: L2 weight decay), 1e-2.
    optimizer : {"adam", "sgd"}
    reward_scale : float
        Factor on J (0.2). The released code runs this ablation as IWU with the improvement
        term off and lambda kept at 0.2, so its score is s = 0.2 J; 1.0 gives the paper's
        formula g_k = z_k (J_k - z.J). With Adam the scale changes the weights only through
        the epsilon and the weight decay (up to 0.38 apart on the CPU default run).
    """

    kind = "RegularizedWeights"
    needs_improvement = False

    def __init__(self, num_tasks: int, lr: float = 0.025, eta: float = 1e-2, optimizer: str = "adam",
                 reward_scale: float = 0.2):
        super().__init__(num_tasks, lr, check_float("eta", eta, 0.0, MAX_WEIGHT_DECAY), optimizer)
        self.eta = self.weight_decay
        self.reward_scale = check_float("reward_scale", reward_scale, 0.0, MAX_COEF, lo_open=True)

    def update(self, rewards: Any, improvements: Any = None) -> np.ndarray:
        J = as_vector("rewards", rewards, self.num_tasks)
        as_vector("improvements", improvements, self.num_tasks, allow_none=True)
        with np.errstate(over="ignore"):
            s = self.reward_scale * J
        return self._step(np.clip(s, -GRAD_LIMIT, GRAD_LIMIT))

    def observe(self, stats: TaskStats) -> np.ndarray:
        """Protocol form of :meth:`update` on J = ``stats.rewards``."""
        return self.update(stats.rewards)

    def _hparams(self) -> dict:
        return {**super()._hparams(), "eta": self.eta, "reward_scale": self.reward_scale}


class UniformWeights:
    """z = 1/K, whatever the inputs (the GRPO / DAPO baseline)."""

    kind = "UniformWeights"
    needs_improvement = False

    def __init__(self, num_tasks: int):
        self.num_tasks = check_positive_int("num_tasks", num_tasks, 1, MAX_TASKS)

    @property
    def weights(self) -> np.ndarray:
        return np.full(self.num_tasks, 1.0 / self.num_tasks)

    def update(self, rewards: Any = None, improvements: Any = None) -> np.ndarray:
        as_vector("rewards", rewards, self.num_tasks, allow_none=True)
        as_vector("improvements", improvements, self.num_tasks, allow_none=True)
        return self.weights

    def observe(self, stats: TaskStats) -> np.ndarray:
        return self.weights

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_tasks": self.num_tasks}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_tasks=self.num_tasks)


class SECCurriculum:
    """Self-Evolving Curriculum (Chen et al., arXiv 2505.14970) over tasks.

    Each task is an arm with value Q_k (init 0). After a step, the reward of task k is the
    mean |advantage| of its samples (high when the task is at the edge of the policy's
    ability); TD(0): Q_k <- Q_k + lr (r_k - Q_k). The weights are the Boltzmann sampling
    probabilities softmax(Q / temperature).

    Parameters
    ----------
    num_tasks : int
    lr : float in (0, 1]
        TD(0) learning rate alpha (0.5).
    temperature : float > 0
        Boltzmann temperature tau (0.2).
    absent : {"zero", "freeze"}
        What happens to the arm of a task with no samples in the update. ``"zero"`` (default,
        the released MT-GRPO code's SEC baseline): every arm is updated and an absent task's
        reward is 0, so Q_k <- (1 - lr) Q_k (halved at lr 0.5); ``"freeze"``: absent arms
        keep their Q.
    """

    kind = "SECCurriculum"
    needs_improvement = False

    def __init__(self, num_tasks: int, lr: float = 0.5, temperature: float = 0.2, absent: str = "zero"):
        self.num_tasks = check_positive_int("num_tasks", num_tasks, 1, MAX_TASKS)
        self.lr = check_float("lr", lr, 0.0, 1.0, lo_open=True)
        self.temperature = check_float("temperature", temperature, 0.0, lo_open=True)
        self.absent = check_choice("absent", absent, ("zero", "freeze"))
        self.q = np.zeros(self.num_tasks)
        self.steps = 0
        self.last_rewards = None   # the last update's arm rewards, for metrics()

    @property
    def weights(self) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = np.clip(self.q / self.temperature, -LOGIT_LIMIT, LOGIT_LIMIT)
        return softmax(x)

    def update(self, rewards: Any, improvements: Any = None, present: Any = None) -> np.ndarray:
        """TD(0) update with ``rewards`` = mean |advantage| per task (float[K]).

        ``present`` (bool[K], optional): the tasks with samples; an absent task's reward
        (any finite placeholder) is replaced by 0 (``absent="zero"``) or its arm is left
        alone (``absent="freeze"``). ``improvements`` is ignored.
        """
        r = as_vector("rewards", rewards, self.num_tasks)
        as_vector("improvements", improvements, self.num_tasks, allow_none=True)
        mask = np.ones(self.num_tasks, bool) if present is None else as_mask("present", present, self.num_tasks)
        if self.absent == "zero":
            r = np.where(mask, r, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            q_new = self.q + self.lr * (r - self.q)
        q_new = np.clip(np.nan_to_num(q_new, nan=0.0), -LOGIT_LIMIT, LOGIT_LIMIT)
        self.q = q_new if self.absent == "zero" else np.where(mask, q_new, self.q)
        self.steps += 1
        self.last_rewards = r
        return self.weights

    def observe(self, stats: TaskStats) -> np.ndarray:
        """TD(0) update with the arms' reward ``stats.mean_abs_advantage`` for the tasks
        ``stats.present`` (SEC's learnability signal; required)."""
        if stats.mean_abs_advantage is None:
            raise ValueError("stats.mean_abs_advantage: SEC's reward is the mean |advantage| per task, got None")
        return self.update(stats.mean_abs_advantage, present=stats.present)

    def metrics(self) -> dict:
        """The last arm rewards (``sec_reward``)."""
        return {"sec_reward": self.last_rewards}

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_tasks": self.num_tasks, "lr": self.lr,
                "temperature": self.temperature, "absent": self.absent, "q": self.q.tolist(), "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_tasks=self.num_tasks)
        for key in ("q", "steps"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        q = check_logits("state_dict['q']", d["q"], self.num_tasks).copy()
        self.q, self.steps = q, check_int("state_dict['steps']", d["steps"], 0)


class TaskRewardTracker:
    """EMA of per-task accuracy J_k over generation rounds (MT-GRPO ``reward_ema = 0.5``).

    ``update(rewards, present)``: J_k <- decay J_k + (1 - decay) r_k for present tasks.
    Tasks never observed report ``initial``.
    ``observe(task_ids, correct)`` computes r_k (share of rollouts with full reward) from
    per-rollout arrays and calls ``update``.

    Parameters
    ----------
    num_tasks : int
    decay : float in [0, 1)
        EMA decay d (0.5).
    initial : float
        J_k before the first observation (0).
    init : {"zero", "first"}
        ``"zero"`` (default, the released code): the EMA starts from ``initial``, so with
        d = 0.5 the first observation gives J = 0.5 r (and the start value still weighs
        2**-t after t observations); ``"first"``: a task's first observation sets J_k = r_k.
    """

    kind = "TaskRewardTracker"

    def __init__(self, num_tasks: int, decay: float = 0.5, initial: float = 0.0, init: str = "zero"):
        self.num_tasks = check_positive_int("num_tasks", num_tasks, 1, MAX_TASKS)
        self.decay = check_float("decay", decay, 0.0, 1.0, hi_open=True)
        self.initial = check_float("initial", initial)
        self.init = check_choice("init", init, ("zero", "first"))
        self.values = np.full(self.num_tasks, self.initial)
        self.seen = np.zeros(self.num_tasks, bool)

    def update(self, rewards: Any, present: Any = None) -> np.ndarray:
        r = as_vector("rewards", rewards, self.num_tasks)
        mask = np.ones(self.num_tasks, bool) if present is None else as_mask("present", present, self.num_tasks)
        ema = self.decay * self.values + (1.0 - self.decay) * r
        new = ema if self.init == "zero" else np.where(self.seen, ema, r)
        self.values = np.where(mask, new, self.values)
        self.seen |= mask
        return self.values.copy()

    def observe(self, task_ids: Any, correct: Any) -> np.ndarray:
        """Per-rollout ``task_ids[N]`` (ints in [0, K)) and ``correct[N]`` (bool or reward in
        [0, 1]; full reward counts as correct): updates the tasks present."""
        t = np.asarray(task_ids)
        if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"task_ids: expected a 1-D integer array, got dtype {t.dtype} shape {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.num_tasks):
            raise ValueError(f"task_ids: expected values in [0, {self.num_tasks}), got [{t.min()}, {t.max()}]")
        c = as_vector("correct", correct, t.shape[0])
        c = (c >= 1.0).astype(np.float64)
        cnt = np.bincount(t, minlength=self.num_tasks)
        hits = np.bincount(t, weights=c, minlength=self.num_tasks)
        present = cnt > 0
        r = np.where(present, hits / np.maximum(cnt, 1), 0.0)
        return self.update(r, present)

    def state_dict(self) -> dict:
        return {"type": self.kind, "num_tasks": self.num_tasks, "decay": self.decay, "init": self.init,
                "values": self.values.tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, self.kind, num_tasks=self.num_tasks)
        for key in ("values", "seen"):
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
        values = as_vector("state_dict['values']", d["values"], self.num_tasks).copy()
        self.seen = as_mask("state_dict['seen']", d["seen"], self.num_tasks).copy()
        self.values = values
