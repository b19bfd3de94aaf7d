"""Optimisers shared by the training code (hardware-aware fine-tuning, the file
classifier's readout)."""

from __future__ import annotations

import numpy as np


class Adam:
    """Adam (Kingma & Ba 2015) with its usual defaults beta1 0.9, beta2 0.999, eps 1e-8.

    ``params`` maps names to arrays; ``step`` replaces them by their updated values.
    ``lr`` may be changed between steps (learning-rate schedules)."""

    def __init__(self, params: dict, lr: float):
        self.lr = lr
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        for key, g in grads.items():
            self.m[key] = b1 * self.m[key] + (1 - b1) * g
            self.v[key] = b2 * self.v[key] + (1 - b2) * g * g
            m_hat = self.m[key] / (1 - b1**self.t)
            v_hat = self.v[key] / (1 - b2**self.t)
            params[key] = params[key] - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


__all__ = ["Adam"]
