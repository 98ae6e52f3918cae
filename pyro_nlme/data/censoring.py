"""Censored observations on the dense grid (detection limits), read from the Monolix / nlmixr2
columns ``cens`` and ``limit``.

``cens = 1``: left-censored, the value is an upper bound (e.g. a limit of quantification; with a
``limit``, the value lies in ``[limit, value]``). ``cens = -1``: right-censored, the value is a
lower bound (with a ``limit``, in ``[value, limit]``). ``cens = 0``: observed exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Censoring:
    """Per-cell censoring of an :class:`~pyro_nlme.data.NLMEData` grid ``[V, S, P, T]``.

    :param code: int8 ``1`` left-censored (recorded value = upper bound), ``-1`` right-censored
        (recorded value = lower bound), ``0`` observed or padding.
    :param lower: float lower bounds of the censored values, ``-inf`` where open (and at
        uncensored cells), in trait units.
    :param upper: float upper bounds, ``+inf`` where open (and at uncensored cells).
    """

    code: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def censored(self) -> torch.Tensor:
        """bool ``[V, S, P, T]``: the censored cells."""
        return self.code != 0

    def take(self, rows: torch.Tensor) -> Censoring:
        """The varieties at positions ``rows``."""
        return Censoring(self.code[rows], self.lower[rows], self.upper[rows])

    def to(self, device: torch.device | str) -> Censoring:
        return dataclasses.replace(
            self,
            code=self.code.to(device),
            lower=self.lower.to(device),
            upper=self.upper.to(device),
        )

    def counts(self, mask: torch.Tensor) -> dict[str, int]:
        """Censored cells among ``mask`` by kind: ``left`` (no lower bound), ``right`` (no upper
        bound) and ``interval`` (both)."""
        has_lower = torch.isfinite(self.lower) & self.censored & mask
        has_upper = torch.isfinite(self.upper) & self.censored & mask
        return {
            "left": int((has_upper & ~has_lower).sum()),
            "right": int((has_lower & ~has_upper).sum()),
            "interval": int((has_lower & has_upper).sum()),
        }
