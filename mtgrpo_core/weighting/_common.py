"""Shared pieces of the controllers: input checks, a stable softmax, a tiny Adam.

Everything here is numpy float64 on the host; the controllers hold a handful of numbers
(K tasks, B bins), so the cost is microseconds per call.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import (as_mask, as_vector, check_choice, check_float, check_int,  # noqa: F401
                        check_positive_int, check_state)

# |gradient| above this is clipped before Adam/SGD: it keeps g**2 finite (1e100**2 = 1e200)
# whatever the scale of the rewards; realistic gradients are O(1), so it never binds.
GRAD_LIMIT = 1e100
# logits are kept within +-1e150: softmax only sees differences, and this keeps
# weight_decay * xi and Adam's moments finite for any finite step size.
LOGIT_LIMIT = 1e150
# Hyperparameter ceilings, far above any useful value (paper: lr 0.025, weight decay
# 1e-5..1e-2, lambda 0.1..1.2) and low enough that no product overflows: with |xi| <= 1e150
# and |g| <= 1e100, weight_decay * xi + g <= 1e153, whose square (Adam's second moment,
# 1e306) is still finite; 1e300 gave inf - inf = NaN weights before these bounds.
MAX_LR = 1e3
MAX_WEIGHT_DECAY = 1e3
MAX_COEF = 1e6  # lambda, eta of the GDRO controllers, improvement clip
# Sizes: every controller allocates O(size) (the classifier O(prompts * window), the
# rollout allocator O(groups * arms)); above these a constructor would die in MemoryError.
MAX_TASKS = 1_000_000
MAX_WINDOW = 100_000
MAX_ROLLOUTS = 65_536


def check_logits(name: str, x: Any, size: int, limit: float = LOGIT_LIMIT) -> np.ndarray:
    """Finite logits of length ``size`` within +-``limit`` (ValueError naming ``name``)."""
    arr = as_vector(name, x, size)
    if np.any(np.abs(arr) > limit):
        raise ValueError(f"{name}: expected values within +-{limit:g}, got {arr.tolist()[:8]}")
    return arr


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax through log-sum-exp: finite and on the simplex for any finite ``x``."""
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


class Adam:
    """Adam on a parameter vector with L2 weight decay added to the gradient
    (``torch.optim.Adam(weight_decay=...)`` semantics, not AdamW), eps = 1e-8."""

    def __init__(self, size: int, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-8):
        self.lr, self.b1, self.b2 = lr, float(betas[0]), float(betas[1])
        self.weight_decay, self.eps = weight_decay, eps
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0

    def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        g = grad + self.weight_decay * param
        self.t += 1
        self.m = self.b1 * self.m + (1.0 - self.b1) * g
        self.v = self.b2 * self.v + (1.0 - self.b2) * g * g
        mhat = self.m / (1.0 - self.b1 ** self.t)
        vhat = self.v / (1.0 - self.b2 ** self.t)
        return param - self.lr * mhat / (np.sqrt(vhat) + self.eps)

    def state(self) -> dict:
        return {"m": self.m.tolist(), "v": self.v.tolist(), "t": self.t}

    def load(self, d: dict) -> None:
        if not isinstance(d, dict):
            raise ValueError(f"state_dict['adam']: expected a dict, got {type(d).__name__}")
        for key in ("m", "v", "t"):
            if key not in d:
                raise ValueError(f"state_dict['adam']: missing key {key!r}")
        m = as_vector("state_dict['adam']['m']", d["m"], self.m.shape[0])
        v = as_vector("state_dict['adam']['v']", d["v"], self.v.shape[0])
        if np.any(v < 0):
            raise ValueError(f"state_dict['adam']['v']: second moments must be >= 0, got {v.tolist()[:8]}")
        t = check_int("state_dict['adam']['t']", d["t"], 0)  # t < 0 would divide by 1 - b**0 = 0
        self.m, self.v, self.t = m.copy(), v.copy(), t
