"""Shared pieces of the controllers: input checks, a stable softmax, a tiny Adam.

Everything here is numpy float64 on the host; the controllers hold a handful of numbers
(K tasks, B bins), so the cost is microseconds per call.
"""
from __future__ import annotations

import numpy as np

from .._validate import as_mask, as_vector, check_choice, check_float, check_positive_int, check_state  # noqa: F401

# |gradient| above this is clipped before Adam/SGD: it keeps g**2 finite (1e100**2 = 1e200)
# whatever the scale of the rewards; realistic gradients are O(1), so it never binds.
GRAD_LIMIT = 1e100
# logits are kept within +-1e150: softmax only sees differences, and this keeps
# weight_decay * xi and Adam's moments finite for any finite step size.
LOGIT_LIMIT = 1e150


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
        m = as_vector("state_dict['m']", d["m"], self.m.shape[0])
        v = as_vector("state_dict['v']", d["v"], self.v.shape[0])
        self.m, self.v, self.t = m.copy(), v.copy(), int(d["t"])
