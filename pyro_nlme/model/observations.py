"""Observation models: the distribution of a measured value given the curve's prediction.

An observation model samples its own population-level noise parameters (sites named
``noise_*``) and returns a distribution with the prediction's batch shape. The loss every
engine optimises follows from it: a Gaussian log-density for an additive error, a log-normal one
for a multiplicative error, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyro
import pyro.distributions as dist
import torch


def _positive(x: torch.Tensor) -> torch.Tensor:
    """``x`` floored at the smallest positive normal number of its dtype: keeps scales valid
    where a prediction underflows to 0, and changes nothing elsewhere."""
    return x.clamp(min=torch.finfo(x.dtype).tiny)


class ObservationModel(Protocol):
    """What a model needs from an observation model."""

    name: str

    def sample_noise(self) -> dict[str, torch.Tensor]:
        """Sample the population-level noise parameters (outside every plate)."""

    def distribution(
        self,
        prediction: torch.Tensor,
        noise: dict[str, torch.Tensor],
        log_prediction: torch.Tensor | None = None,
    ) -> dist.Distribution:
        """The distribution of the observations given the curve's ``prediction`` (and, where
        the model has it in stable form, its logarithm: ``log_prediction``)."""


@dataclass(frozen=True)
class Normal:
    """Additive Gaussian error: ``y ~ Normal(f, noise_sd)``.

    :param noise_scale: scale of the half-normal prior on ``noise_sd``, trait units.
    """

    noise_scale: float = 1.0
    name: str = "normal"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {"noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale))}

    def distribution(self, prediction, noise, log_prediction=None):
        return dist.Normal(prediction, noise["noise_sd"])


@dataclass(frozen=True)
class LogNormal:
    """Multiplicative error: ``log y ~ Normal(log f, noise_sd)`` (``noise_sd`` is roughly the
    coefficient of variation). Needs ``y > 0`` and ``f > 0``.

    :param noise_scale: scale of the half-normal prior on ``noise_sd``, log units.
    """

    noise_scale: float = 0.5
    name: str = "lognormal"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {"noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale))}

    def distribution(self, prediction, noise, log_prediction=None):
        if log_prediction is None:
            log_prediction = torch.log(_positive(prediction))
        return dist.LogNormal(log_prediction, noise["noise_sd"])


@dataclass(frozen=True)
class Proportional:
    """Proportional Gaussian error: ``y ~ Normal(f, noise_cv * f)`` (saemix ``error.model =
    "proportional"``).

    :param noise_scale: scale of the half-normal prior on ``noise_cv`` (dimensionless).
    """

    noise_scale: float = 0.5
    name: str = "proportional"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {"noise_cv": pyro.sample("noise_cv", dist.HalfNormal(self.noise_scale))}

    def distribution(self, prediction, noise, log_prediction=None):
        return dist.Normal(prediction, _positive(noise["noise_cv"] * prediction.abs()))


@dataclass(frozen=True)
class Combined:
    """Combined error: ``y ~ Normal(f, sqrt(noise_sd**2 + (noise_cv * f)**2))`` (saemix
    ``"combined"``, Monolix ``combined2``).

    :param noise_scale: half-normal prior scale of the additive part ``noise_sd`` (trait units).
    :param cv_scale: half-normal prior scale of the proportional part ``noise_cv``.
    """

    noise_scale: float = 1.0
    cv_scale: float = 0.5
    name: str = "combined"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {
            "noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale)),
            "noise_cv": pyro.sample("noise_cv", dist.HalfNormal(self.cv_scale)),
        }

    def distribution(self, prediction, noise, log_prediction=None):
        scale = torch.hypot(noise["noise_sd"], noise["noise_cv"] * prediction)
        return dist.Normal(prediction, _positive(scale))


@dataclass(frozen=True)
class Power:
    """Power-of-mean error: ``y ~ Normal(f, noise_sd * |f| ** noise_power)`` (nlme
    ``varPower``). ``noise_power`` has a Normal(0.5, 0.5) prior.

    :param noise_scale: half-normal prior scale of ``noise_sd`` (trait units ** (1 - power)).
    """

    noise_scale: float = 1.0
    name: str = "power"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {
            "noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale)),
            "noise_power": pyro.sample("noise_power", dist.Normal(0.5, 0.5)),
        }

    def distribution(self, prediction, noise, log_prediction=None):
        log_magnitude = torch.log(_positive(prediction.abs()))
        scale = noise["noise_sd"] * torch.exp(noise["noise_power"] * log_magnitude)
        return dist.Normal(prediction, _positive(scale))


OBSERVATION_MODELS = {
    model.name: model for model in (Normal, LogNormal, Proportional, Combined, Power)
}
"""Observation models by name (the ``--likelihood`` choices)."""


def observation_model(name: str | ObservationModel, **prior_scales: float) -> ObservationModel:
    """An observation model given by name (with its prior scales) or passed through."""
    if not isinstance(name, str):
        return name
    if name not in OBSERVATION_MODELS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(OBSERVATION_MODELS)}")
    return OBSERVATION_MODELS[name](**prior_scales)
