"""Observation models: the distribution of a measured value given the curve's prediction.

An observation model samples its own population-level noise parameters (sites named
``noise_*``) and returns a distribution with the prediction's batch shape. The loss every
engine optimises follows from it: a Gaussian log-density for an additive error, a log-normal one
for a multiplicative error, a Poisson one for counts, and so on. ``docs/observation_models.md``
lists every model with its parameters, priors and link.

Continuous models are censored by :func:`pyro_nlme.model.convention.observe` where the data
carry detection limits (:mod:`pyro_nlme.model.censoring`); the binomial model takes its number
of trials per observation from the data in the same place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ExpTransform, OrderedTransform


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


DF_PRIOR = (2.0, 0.1)
"""Gamma(concentration, rate) prior of the Student-t degrees of freedom ``noise_df`` (brms'
default for its ``student`` family: mean 20, 5% quantile 3.6)."""


def _df_prior() -> dist.Distribution:
    return dist.Gamma(*DF_PRIOR)


@dataclass(frozen=True)
class StudentT:
    """Robust additive error: ``y ~ StudentT(noise_df, f, noise_sd)``; heavy tails absorb
    outlying images. ``noise_df`` has a Gamma(2, 0.1) prior (:data:`DF_PRIOR`).

    :param noise_scale: half-normal prior scale of ``noise_sd`` (trait units).
    """

    noise_scale: float = 1.0
    name: str = "student_t"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {
            "noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale)),
            "noise_df": pyro.sample("noise_df", _df_prior()),
        }

    def distribution(self, prediction, noise, log_prediction=None):
        return dist.StudentT(noise["noise_df"], prediction, noise["noise_sd"])


@dataclass(frozen=True)
class LogStudentT:
    """Robust multiplicative error: ``log y ~ StudentT(noise_df, log f, noise_sd)``, the
    log-normal model with heavy tails (for biomass, whose errors are multiplicative and whose
    outlying images, e.g. a badly segmented plant, are off by a factor). The density is that of
    ``y`` (Jacobian ``1 / y`` included), so it compares with the other models'. Needs ``y > 0``.

    :param noise_scale: half-normal prior scale of ``noise_sd`` (log units).
    """

    noise_scale: float = 0.5
    name: str = "log_student_t"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {
            "noise_sd": pyro.sample("noise_sd", dist.HalfNormal(self.noise_scale)),
            "noise_df": pyro.sample("noise_df", _df_prior()),
        }

    def distribution(self, prediction, noise, log_prediction=None):
        if log_prediction is None:
            log_prediction = torch.log(_positive(prediction))
        base = dist.StudentT(noise["noise_df"], log_prediction, noise["noise_sd"])
        return dist.TransformedDistribution(base, ExpTransform())


def _log_mean(prediction: torch.Tensor, log_prediction: torch.Tensor | None) -> torch.Tensor:
    return torch.log(_positive(prediction)) if log_prediction is None else log_prediction


class _LogRatePoisson(dist.Poisson):
    """``Poisson(exp(log_rate))`` scored from ``log_rate``, exact where the rate underflows."""

    def __init__(self, log_rate: torch.Tensor, validate_args=None):
        self.log_rate = log_rate
        super().__init__(log_rate.exp(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return _LogRatePoisson(self.log_rate.expand(batch_shape))

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return value * self.log_rate - self.rate - (value + 1).lgamma()


@dataclass(frozen=True)
class Poisson:
    """Counts (e.g. leaf number): ``y ~ Poisson(f)``, mean and variance ``f``. Scored from
    ``log f`` where the model gives it. No noise parameter."""

    name: str = "poisson"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {}

    def distribution(self, prediction, noise, log_prediction=None):
        return _LogRatePoisson(_log_mean(prediction, log_prediction))


@dataclass(frozen=True)
class NegativeBinomial:
    """Over-dispersed counts: ``y ~ NegativeBinomial`` with mean ``f`` and variance
    ``f + noise_overdispersion * f**2`` (the NB2 parametrisation; ``noise_overdispersion`` is
    ``1 / total_count``, 0 is Poisson). Logits ``log f + log noise_overdispersion``, stable in
    ``log f``.

    :param noise_scale: half-normal prior scale of ``noise_overdispersion`` (1: a coefficient of
        variation of the gamma-distributed rate of about 1 is plausible, 3 is not).
    """

    noise_scale: float = 1.0
    name: str = "negative_binomial"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        site = dist.HalfNormal(self.noise_scale)
        return {"noise_overdispersion": pyro.sample("noise_overdispersion", site)}

    def distribution(self, prediction, noise, log_prediction=None):
        overdispersion = _positive(noise["noise_overdispersion"])
        logits = _log_mean(prediction, log_prediction) + overdispersion.log()
        return dist.NegativeBinomial(total_count=1 / overdispersion, logits=logits)


def cumulative_hazard_logits(
    prediction: torch.Tensor, log_prediction: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of ``p = 1 - exp(-f)`` (the complementary log-log link with linear predictor
    ``log f``): ``log(expm1(f))``, computed as ``f + log1p(-exp(-f))`` for ``f > 1`` and as
    ``log f + log(expm1(f) / f)`` below, where ``log f`` may come exact from the model.

    :param prediction: the curve ``f >= 0``, read as a cumulative hazard (any shape).
    :returns: logits of the same shape; where ``f`` is 0 (or underflows), those of ``f`` equal
        to the dtype's smallest normal number, so that no observation becomes impossible.
    """
    large = prediction.clamp(min=1.0)
    small = _positive(prediction.clamp(max=1.0))
    log_small = torch.log(small) if log_prediction is None else log_prediction
    return torch.where(
        prediction > 1.0,
        large + torch.log1p(-torch.exp(-large)),
        log_small + torch.log(torch.expm1(small) / small),
    )


@dataclass(frozen=True)
class Bernoulli:
    """Presence/absence (e.g. an organ present): ``y ~ Bernoulli(1 - exp(-f))``. The curve is
    a cumulative hazard: any ``f >= 0`` gives a valid probability, without clamping, rising from
    0 at ``f = 0`` to ``1 - exp(-A)`` at an asymptote ``A`` (:func:`cumulative_hazard_logits`).
    No noise parameter."""

    name: str = "bernoulli"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {}

    def distribution(self, prediction, noise, log_prediction=None):
        return dist.Bernoulli(logits=cumulative_hazard_logits(prediction, log_prediction))


@dataclass(frozen=True)
class Binomial:
    """Successes out of ``trials`` per observation: ``y ~ Binomial(trials, 1 - exp(-f))``,
    link as :class:`Bernoulli`. The number of trials comes from the data's ``trials`` column
    (:func:`~pyro_nlme.model.convention.observe` sets it; 1 until then). No noise parameter."""

    name: str = "binomial"

    def sample_noise(self) -> dict[str, torch.Tensor]:
        return {}

    def distribution(self, prediction, noise, log_prediction=None):
        logits = cumulative_hazard_logits(prediction, log_prediction)
        return dist.Binomial(total_count=torch.ones_like(logits), logits=logits)


def ordinal_log_probs(predictor: torch.Tensor, cutpoints: torch.Tensor) -> torch.Tensor:
    """``log P(y = k)``, ``k = 0 .. C - 1``, of the cumulative logit model
    ``P(y <= k) = sigmoid(c_k - eta)``, computed without differences of probabilities:
    ``P(y = k) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a))`` with ``a = c_k - eta``,
    ``b = c_{k-1} - eta``.

    :param predictor: linear predictor ``eta``, any batch shape.
    :param cutpoints: increasing ``[C - 1]``.
    :returns: ``[..., C]``.
    """
    a = cutpoints - predictor.unsqueeze(-1)
    upper, lower = a[..., 1:], a[..., :-1]
    gap = (lower - upper).clamp(max=-torch.finfo(a.dtype).eps)
    middle = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(gap))
    return torch.cat([F.logsigmoid(a[..., :1]), middle, F.logsigmoid(-a[..., -1:])], dim=-1)


@dataclass(frozen=True)
class Ordinal:
    """Ordered scores ``0 .. C - 1`` (e.g. a visual stress score), cumulative logit:
    ``P(y <= k) = sigmoid(noise_cutpoints[k] - f)``, the curve's prediction as the linear
    predictor (a higher curve, a higher score).

    The ``C - 1`` cutpoints ``noise_cutpoints`` are one ordered-vector site whose prior is the
    image of independent normals under ``c_0 = x_0, c_k = c_{k-1} + exp(x_k)`` (proper, and
    ordered by construction): ``x_0 ~ Normal(cutpoint_loc, cutpoint_scale)`` (logit units),
    ``x_k ~ Normal(0, gap_scale)`` (log gaps, median gap 1 logit).

    :param n_categories: ``C >= 2``.
    """

    n_categories: int
    cutpoint_loc: float = 0.0
    cutpoint_scale: float = 5.0
    gap_scale: float = 1.0
    name: str = "ordinal"

    def __post_init__(self) -> None:
        if int(self.n_categories) != self.n_categories or self.n_categories < 2:
            raise ValueError(f"ordinal needs n_categories >= 2, got {self.n_categories!r}")

    def sample_noise(self) -> dict[str, torch.Tensor]:
        size = int(self.n_categories) - 1
        loc = torch.zeros(size)
        loc[0] = self.cutpoint_loc
        scale = torch.full((size,), float(self.gap_scale))
        scale[0] = self.cutpoint_scale
        prior = dist.TransformedDistribution(
            dist.Normal(loc, scale).to_event(1), OrderedTransform()
        )
        return {"noise_cutpoints": pyro.sample("noise_cutpoints", prior)}

    def distribution(self, prediction, noise, log_prediction=None):
        cutpoints = noise["noise_cutpoints"].to(prediction)
        return dist.Categorical(logits=ordinal_log_probs(prediction, cutpoints))


OBSERVATION_MODELS = {
    model.name: model
    for model in (
        Normal,
        LogNormal,
        Proportional,
        Combined,
        Power,
        StudentT,
        LogStudentT,
        Poisson,
        NegativeBinomial,
        Bernoulli,
        Binomial,
        Ordinal,
    )
}
"""Observation models by name (the ``--likelihood`` choices; ``ordinal:C`` for ``C``
categories)."""


def observation_model(name: str | ObservationModel, **prior_scales: float) -> ObservationModel:
    """An observation model given by name (with its prior scales) or passed through.

    :param name: a key of :data:`OBSERVATION_MODELS`; ``"ordinal:C"`` is the ordinal model with
        ``C`` categories.
    """
    if not isinstance(name, str):
        return name
    key, _, argument = name.partition(":")
    if key not in OBSERVATION_MODELS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(OBSERVATION_MODELS)}")
    if key == Ordinal.name:
        if not argument.strip().isdigit():
            raise ValueError(
                f"likelihood {name!r}: give the number of categories, e.g. 'ordinal:5'"
            )
        return Ordinal(int(argument), **prior_scales)
    if argument:
        raise ValueError(f"likelihood {key!r} takes no argument, got {name!r}")
    return OBSERVATION_MODELS[key](**prior_scales)
