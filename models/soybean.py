"""Soybean leaf weight (R ``nlme::Soybean``): logistic growth per plot with three correlated
random effects and Variety and Year covariates on every curve parameter (Davidian & Giltinan
1995; Pinheiro & Bates 2000, sec. 6.3)::

    phi[i] = intercept + X[i] @ covariate_effect + random_effect[i]
    random_effect[i] ~ MultivariateNormal(0, diag(random_effect_sd) C diag(random_effect_sd))
    curve[i, t] = exp(phi0) / (1 + exp((phi1 - time) / exp(phi2)))
    obs ~ Normal(curve, noise_sd * curve ** noise_power)   (power-of-mean variance by default)

with ``phi = (log asymptote, inflection, log scale)`` (saemix-style log-normal asymptote and
scale), ``X`` the treatment-coded plot covariates (Variety P vs F, Year 1989 and 1990 vs 1988)
and ``C`` an LKJ correlation matrix. Plots are the ``variety`` axis.
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
from pyro_nlme.model.curves import logistic
from pyro_nlme.model.observations import ObservationModel

CURVE_PARAMETERS = ("log_asymptote", "inflection", "log_scale")


@nlme_model(
    event_dims={
        "intercept": ("curve_parameter",),
        "covariate_effect": ("covariate", "curve_parameter"),
        "random_effect_sd": ("curve_parameter",),
        "random_effect_corr": ("curve_parameter", "curve_parameter_bis"),
        "random_effect": ("curve_parameter",),
    },
    coords=lambda data: {
        "curve_parameter": CURVE_PARAMETERS,
        "curve_parameter_bis": CURVE_PARAMETERS,
        "covariate": data.covariate_names,
    },
)
def soybean(
    data: NLMEData,
    subsample_size: int | None = None,
    likelihood: str | ObservationModel = "power",
) -> torch.Tensor:
    """:param data: plots as varieties, with per-plot covariates (``data.covariate_design``).
    :param likelihood: observation model (default ``power``: nlme's ``varPower``).
    """
    scale = GrowthScale.of(data)
    centre, spread = scale.logistic_centre, scale.logistic_spread
    # (log asymptote, inflection, log scale): the logistic centres with rate -> scale = 1 / rate.
    centre = torch.stack([centre[0], centre[2], -centre[1]])
    spread = torch.stack([spread[0], spread[2], spread[1]])
    n_covariates = data.covariate_design.shape[-1]
    intercept = pyro.sample("intercept", dist.Normal(centre, spread).to_event(1))
    covariate_effect = pyro.sample(
        "covariate_effect",
        dist.Normal(torch.zeros_like(spread), spread).expand([n_covariates, 3]).to_event(2),
    )
    random_effect_sd = pyro.sample("random_effect_sd", dist.HalfNormal(spread).to_event(1))
    random_effect_corr = pyro.sample("random_effect_corr", dist.LKJCholesky(3, 1.0))
    noise = observation_model(likelihood).sample_noise()
    scale_tril = random_effect_sd[..., None] * random_effect_corr
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        fixed = intercept + batch.covariate_design @ covariate_effect
        effect = pyro.sample(
            "random_effect",
            dist.MultivariateNormal(torch.zeros_like(spread), scale_tril=scale_tril),
        )
        phi = fixed[:, None, None, None, :] + effect
        with scenario_plate(data), plant_plate(data), time_plate(data):
            curve = logistic(batch.times, phi[..., 0].exp(), (-phi[..., 2]).exp(), phi[..., 1])
            pyro.deterministic(CURVE_SITE, curve)
            return observe(batch, observation_model(likelihood).distribution(curve, noise))
