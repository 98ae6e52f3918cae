"""When to stop SVI: a documented plateau rule on the ELBO."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlateauRule:
    """Stop when the loss (negative ELBO) has stopped decreasing.

    The loss history is cut into consecutive windows of ``window`` steps. Window ``j`` improves
    on window ``j - 1`` when its mean loss is lower by more than ``z`` standard errors of the
    difference of the two means (SEs from the within-window SDs). The run stops after
    ``patience`` consecutive windows without improvement, and never before ``min_steps``.

    :param window: steps per window.
    :param patience: windows without improvement before stopping.
    :param z: improvement threshold, in standard errors.
    :param min_steps: no stop before this many steps.
    """

    window: int = 250
    patience: int = 3
    z: float = 2.0
    min_steps: int = 1000

    def converged(self, losses: list[float] | np.ndarray) -> bool:
        """Whether to stop after the last loss of ``losses`` (checked at window ends)."""
        n = len(losses)
        if n < max(self.min_steps, self.window * (self.patience + 1)) or n % self.window:
            return False
        windows = np.asarray(losses[n - self.window * (self.patience + 1) :]).reshape(
            self.patience + 1, self.window
        )
        means = windows.mean(1)
        standard_errors = windows.std(1, ddof=1) / math.sqrt(self.window)
        for j in range(1, self.patience + 1):
            threshold = self.z * math.hypot(standard_errors[j - 1], standard_errors[j])
            if means[j - 1] - means[j] > threshold:
                return False
        return True
