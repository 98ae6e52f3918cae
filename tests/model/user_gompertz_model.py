"""A user model: Gompertz growth with a random asymptote and a random rate per variety.

For variety ``v`` (every scenario and plant of the variety shares its curve)::

    (log_asymptote[v], log_rate[v]) = population_mean + random_effect[v]
    random_effect[v, k] ~ Normal(0, random_effect_sd[k])
    log_curve[v, s, p, t] = log_asymptote[v] - exp(-exp(log_rate[v]) * (time - inflection))
    obs ~ LogNormal(log_curve, noise_sd)        (or another observation model)

Fit it with ``pyro-nlme fit --phenotypes FILE --model path/to/user_gompertz_model.py:gompertz``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_nlme.data import NLMEData
from pyro_nlme.model import (
    CURVE_SITE,
    GrowthScale,
    nlme_model,
    observation_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)

CURVE_PARAMETERS = ("log_asymptote", "log_rate")


def log_gompertz(
    time: torch.Tensor, log_asymptote: torch.Tensor, rate: torch.Tensor, inflection: torch.Tensor
) -> torch.Tensor:
    """``log(asymptote * exp(-exp(-rate * (time - inflection))))``, computed on the log scale:
    the curve itself underflows to 0 in float32 once ``rate * (inflection - time)`` exceeds 4.5.
    """
    return log_asymptote - torch.exp(-rate * (time - inflection))


@nlme_model(
    event_dims={
        "population_mean": ("curve_parameter",),
        "random_effect_sd": ("curve_parameter",),
        "random_effect": ("curve_parameter",),
    },
    coords={"curve_parameter": CURVE_PARAMETERS},
)
def gompertz(
    data: NLMEData, subsample_size: int | None = None, likelihood: str = "lognormal"
) -> torch.Tensor:
    """:param data: the full data set (never a minibatch: the plate picks the batch).
    :param subsample_size: varieties per minibatch (None: all).
    :param likelihood: observation model name (``lognormal``: multiplicative error).
    :returns: the observations ``[B, S, P, T]`` (sampled when ``data.values`` is None).
    """
    # Population level: outside the variety plate; priors located from the data's scale.
    scale = GrowthScale.of(data)
    centre, spread = scale.logistic_centre, scale.logistic_spread
    population_mean = pyro.sample(
        "population_mean", dist.Normal(centre[:2], spread[:2]).to_event(1)
    )
    random_effect_sd = pyro.sample("random_effect_sd", dist.HalfNormal(spread[:2] / 2).to_event(1))
    inflection = pyro.sample("inflection", dist.Normal(centre[2], spread[2]))
    noise = observation_model(likelihood).sample_noise()

    # Individual level: inside the variety plate (dim -4); data indexed by the plate's indices.
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        random_effect = pyro.sample(
            "random_effect",
            dist.Normal(torch.zeros_like(random_effect_sd), random_effect_sd).to_event(1),
        )  # [B, 1, 1, 1, 2]
        phi = population_mean + random_effect
        with scenario_plate(data), plant_plate(data), time_plate(data):
            log_curve = log_gompertz(batch.times, phi[..., 0], phi[..., 1].exp(), inflection)
            curve = pyro.deterministic(CURVE_SITE, log_curve.exp())  # [B, S, P, T]
            distribution = observation_model(likelihood).distribution(
                curve, noise, log_prediction=log_curve
            )
            return observe(batch, distribution)
