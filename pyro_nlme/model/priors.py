"""Weakly informative priors located from the scale of the data (not from fitted values), and the
marker-effect (ridge / GBLUP-like) covariate model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyro_nlme.data import NLMEData
from pyro_nlme.model.marker_priors import MARKER_PLATE, ridge_effects

__all__ = ["MARKER_PLATE", "GrowthScale", "marker_effects"]


@dataclass(frozen=True)
class GrowthScale:
    """Scale of a growth data set, used to place weakly informative priors.

    :param value_max: largest observed value, trait units.
    :param time_start: earliest measurement time, time units.
    :param time_span: latest minus earliest measurement time (> 0), time units.
    """

    value_max: torch.Tensor
    time_start: torch.Tensor
    time_span: torch.Tensor

    @classmethod
    def of(cls, data: NLMEData) -> GrowthScale:
        """From the data summary, i.e. the full data set as loaded: a minibatch or a copy
        without values gives the same prior."""
        summary = data.summary
        if not math.isfinite(summary.value_max):
            raise ValueError("GrowthScale needs at least one observed value")

        def tensor(x: float) -> torch.Tensor:
            return torch.tensor(x, dtype=data.times.dtype, device=data.device)

        return cls(
            value_max=tensor(summary.value_max),
            time_start=tensor(summary.time_min),
            time_span=tensor(max(summary.time_max - summary.time_min, 1e-6)),
        )

    @property
    def logistic_centre(self) -> torch.Tensor:
        """Prior centres of (log asymptote, log rate, inflection): the largest value, a rise
        over about half the observed span, the middle of the span."""
        return torch.stack(
            [
                self.value_max.log(),
                torch.log(8.0 / self.time_span),
                self.time_start + self.time_span / 2,
            ]
        )

    @property
    def logistic_spread(self) -> torch.Tensor:
        """Prior SDs of (log asymptote, log rate, inflection): a factor e on the asymptote and
        the rate, half the span on the inflection."""
        one = torch.ones_like(self.time_span)
        return torch.stack([one, one, self.time_span / 2])


def marker_effects(data: NLMEData, genetic_sd: torch.Tensor, name: str = "marker_effect"):
    """Gaussian marker effects ``[M, K]``, ``beta[m, k] ~ Normal(0, genetic_sd[k] / sqrt(M))``,
    so that with standardised dosages ``Z`` the genetic values ``Z @ beta`` have variance
    ``genetic_sd ** 2`` (the ridge / GBLUP prior, VanRaden scaling). Sampled in the ``marker``
    plate (dim -1), outside the variety plate: population-level. Other priors:
    :mod:`pyro_nlme.model.marker_priors`.

    :param genetic_sd: ``[K]`` genetic SD per curve parameter.
    """
    return ridge_effects(data.n_markers, genetic_sd, name)
