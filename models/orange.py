"""Orange trees (R ``datasets::Orange``): logistic growth of trunk circumference with a random
asymptote per tree (Pinheiro & Bates 2000, sec. 8.2)::

    circumference[i, t] = (asymptote + asymptote_effect[i]) / (1 + exp((inflection - age) / scale))
    asymptote_effect[i] ~ Normal(0, asymptote_sd),   obs ~ Normal(curve, noise_sd)

Trees are the ``variety`` axis. The random effect enters the mean linearly, so the marginal
likelihood is Gaussian in closed form (:func:`pyro_nlme.reference.orange_exact`): an exact
maximum-likelihood reference for every engine. Priors are vague, located and scaled from the
data scale, so that the posterior mode sits at the maximum likelihood.
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
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.curves import logistic


@nlme_model()
def orange(data: NLMEData, subsample_size: int | None = None) -> torch.Tensor:
    """:param data: one variety per tree, ``time`` = age (days), ``value`` = circumference (mm).
    :param subsample_size: trees per minibatch (None: all).
    """
    scale = GrowthScale.of(data)
    asymptote = pyro.sample("asymptote", dist.Normal(scale.value_max, 10 * scale.value_max))
    inflection = pyro.sample(
        "inflection", dist.Normal(scale.time_start + scale.time_span / 2, 10 * scale.time_span)
    )
    curve_scale = pyro.sample(
        "scale",
        dist.LogNormal(torch.log(scale.time_span / 8), torch.tensor(3.0).to(scale.time_span)),
    )
    asymptote_sd = pyro.sample("asymptote_sd", dist.HalfCauchy(scale.value_max))
    noise_sd = pyro.sample("noise_sd", dist.HalfCauchy(scale.value_max / 10))
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        effect = pyro.sample("asymptote_effect", dist.Normal(0.0, asymptote_sd))
        with scenario_plate(data), plant_plate(data), time_plate(data):
            curve = logistic(batch.times, asymptote + effect, 1 / curve_scale, inflection)
            pyro.deterministic(CURVE_SITE, curve)
            return observe(batch, dist.Normal(curve, noise_sd))
