"""Every observation model runs under every engine (SVI, NUTS, SAEM, MCEM) and exports to
ArviZ: a finite fit, a posterior predictive of the trait's type (integers for counts, binary,
binomial and ordinal traits; censored cells recorded at their limit) and a finite
log-likelihood per observation. Recovery itself is checked in
``tests/model/test_observation_recovery.py``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_nlme.data import NLMEData, load_data
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.infer.saem import MCEMConfig, SAEMConfig, fit_mcem, fit_saem
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.model import (
    CURVE_SITE,
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.curves import log_logistic
from pyro_nlme.model.observations import observation_model

DISCRETE = ("poisson", "negative_binomial", "bernoulli", "binomial", "ordinal:3")
CONTINUOUS = ("student_t", "log_student_t")
ASYMPTOTE = {"bernoulli": 2.0, "binomial": 1.5, "ordinal:3": 4.0}
TRUE_NOISE = {
    "negative_binomial": {"noise_overdispersion": 0.2},
    "ordinal:3": {"noise_cutpoints": [1.0, 2.5]},
    "student_t": {"noise_sd": 1.0, "noise_df": 4.0},
    "log_student_t": {"noise_sd": 0.1, "noise_df": 4.0},
    "normal": {"noise_sd": 2.0},
}


@nlme_model()
def random_asymptote(data: NLMEData, subsample_size=None, likelihood="normal"):
    """Logistic curves with a random log asymptote per variety."""
    log_asymptote = pyro.sample("log_asymptote", dist.Normal(2.0, 2.0))
    log_asymptote_sd = pyro.sample("log_asymptote_sd", dist.HalfNormal(0.5))
    inflection = pyro.sample("inflection", dist.Normal(6.0, 3.0))
    obs_model = observation_model(likelihood)
    noise = obs_model.sample_noise()
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        effect = pyro.sample("log_asymptote_effect", dist.Normal(0.0, log_asymptote_sd))
        with scenario_plate(data), plant_plate(data), time_plate(data):
            log_curve = log_logistic(
                batch.times, log_asymptote + effect, torch.tensor(0.6), inflection
            )
            curve = pyro.deterministic(CURVE_SITE, log_curve.exp())
            return observe(batch, obs_model.distribution(curve, noise, log_prediction=log_curve))


def simulated(likelihood: str, censored: bool = False, n_varieties: int = 8) -> NLMEData:
    """Data simulated from ``random_asymptote`` (12 images of each variety); with ``censored``,
    values below 15 are recorded as left-censored at 15."""
    n_times = 12
    frame = pd.DataFrame(
        {
            "variety": np.repeat([f"V{i}" for i in range(n_varieties)], n_times),
            "time": np.tile(np.arange(n_times, dtype=float), n_varieties),
            "value": 0.0,
        }
    )
    if likelihood == "binomial":
        frame["trials"] = np.random.default_rng(0).integers(1, 6, len(frame))
    truth = {
        "log_asymptote": math.log(ASYMPTOTE.get(likelihood, 30.0)),
        "log_asymptote_sd": 0.2,
        "inflection": 6.0,
        **TRUE_NOISE.get(likelihood, {}),
    }
    data = load_data(frame)
    pyro.set_rng_seed(0)
    truth = {k: torch.as_tensor(v) for k, v in truth.items()}
    values = poutine.condition(random_asymptote, truth)(data.without_values(), None, likelihood)
    frame["value"] = values[data.mask].numpy()
    if censored:
        below = frame["value"] < 15.0
        frame["cens"] = below.astype(int)
        frame["value"] = frame["value"].where(~below, 15.0)
    return load_data(frame)


SVI = SVIConfig(
    guide="normal", batch_size=None, max_steps=30, stopping=None, num_draws=20, progress=False
)
NUTS = NUTSConfig(chains=1, warmup=10, samples=6, max_tree_depth=5, progress=False)
SAEM = SAEMConfig(iterations=(4, 3), importance_samples=50, fisher_samples=20, progress=False)
MCEM = MCEMConfig(iterations=3, progress=False)
ENGINES = {
    "svi": lambda d, k: fit_svi(random_asymptote, d, SVI, model_kwargs=k),
    "nuts": lambda d, k: fit_nuts(random_asymptote, d, NUTS, model_kwargs=k),
    "saem": lambda d, k: fit_saem(random_asymptote, d, SAEM, model_kwargs=k),
    "mcem": lambda d, k: fit_mcem(random_asymptote, d, MCEM, model_kwargs=k),
}


def check_export(idata, data: NLMEData, likelihood: str) -> None:
    observed = idata.observed_data["obs"].values
    log_likelihood = idata.log_likelihood["obs"].values
    assert log_likelihood.shape[-1] == int(data.mask.sum())
    assert np.isfinite(log_likelihood).all()
    if "posterior_predictive" not in idata.groups():
        return
    predictive = idata.posterior_predictive["obs"].values
    assert predictive.shape[-1] == observed.shape[-1]
    assert np.isfinite(predictive).all()
    if likelihood.split(":")[0] in {m.split(":")[0] for m in DISCRETE}:
        assert (predictive == np.round(predictive)).all() and (predictive >= 0).all()
    if likelihood == "bernoulli":
        assert set(np.unique(predictive)) <= {0.0, 1.0}
    if likelihood == "ordinal:3":
        assert set(np.unique(predictive)) <= {0.0, 1.0, 2.0}
    if likelihood == "binomial":
        trials = data.trials[data.mask].numpy()
        assert (predictive <= trials).all()


SLOW = pytest.mark.slow
CASES = [
    ("svi", "poisson"),
    pytest.param("nuts", "ordinal:3", marks=SLOW),
    pytest.param("saem", "binomial", marks=SLOW),
    pytest.param("mcem", "negative_binomial", marks=SLOW),
    pytest.param("saem", "student_t", marks=SLOW),
]
"""One case per engine; SVI's runs in the default suite, the others take 45-95 s each on the
shared 2-core machine."""


@pytest.mark.parametrize("engine, likelihood", CASES)
def test_observation_model_under_engine(engine, likelihood):
    data = simulated(likelihood)
    fit = ENGINES[engine](data, {"likelihood": likelihood})
    table = fit.population_summary
    point = table["mean" if "mean" in table else "estimate"].to_numpy(float)
    assert np.isfinite(point).all()
    check_export(fit.inference_data, data, likelihood)


@pytest.mark.parametrize("engine", ["svi", pytest.param("saem", marks=SLOW)])
def test_censored_data_under_engine(engine):
    data = simulated("normal", censored=True)
    assert data.summary.n_left_censored > 5
    fit = ENGINES[engine](data, {"likelihood": "normal"})
    check_export(fit.inference_data, data, "normal")
    if "posterior_predictive" in fit.inference_data.groups():
        predictive = fit.inference_data.posterior_predictive["obs"].values
        censored = data.censoring.censored[data.mask].numpy()
        # Censored cells are recorded as the detection limit or as a draw above it.
        assert (predictive[..., censored] >= 15.0).all()
        assert (predictive[..., censored] == 15.0).mean() > 0.3


@pytest.mark.extended
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("likelihood", DISCRETE + CONTINUOUS)
def test_every_observation_model_under_every_engine(engine, likelihood):
    data = simulated(likelihood)
    fit = ENGINES[engine](data, {"likelihood": likelihood})
    check_export(fit.inference_data, data, likelihood)
