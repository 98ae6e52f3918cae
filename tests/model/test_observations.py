"""Observation models: log-densities against scipy.stats, noise sites, the name registry."""

from __future__ import annotations

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_nlme.model.observations import (
    OBSERVATION_MODELS,
    Combined,
    LogNormal,
    Normal,
    Ordinal,
    Power,
    Proportional,
    observation_model,
)

PREDICTION = np.array([[0.5, 3.0, 40.0], [120.0, 7.5, 1.0]])
OBSERVED = np.array([[0.7, 2.5, 43.0], [110.0, 8.0, 0.9]])
NOISE = {"noise_sd": 0.3, "noise_cv": 0.15, "noise_power": 0.7}


def scipy_log_prob(name: str) -> np.ndarray:
    f, y = PREDICTION, OBSERVED
    sd, cv, power = NOISE["noise_sd"], NOISE["noise_cv"], NOISE["noise_power"]
    if name == "normal":
        return stats.norm.logpdf(y, loc=f, scale=sd)
    if name == "lognormal":
        return stats.lognorm.logpdf(y, s=sd, scale=f)
    if name == "proportional":
        return stats.norm.logpdf(y, loc=f, scale=cv * np.abs(f))
    if name == "combined":
        return stats.norm.logpdf(y, loc=f, scale=np.sqrt(sd**2 + (cv * f) ** 2))
    if name == "power":
        return stats.norm.logpdf(y, loc=f, scale=sd * np.abs(f) ** power)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["normal", "lognormal", "proportional", "combined", "power"])
def test_log_prob_equals_scipy(name):
    model = observation_model(name)
    noise = {k: torch.tensor(v, dtype=torch.float64) for k, v in NOISE.items()}
    distribution = model.distribution(torch.tensor(PREDICTION), noise)
    assert distribution.batch_shape == PREDICTION.shape
    log_prob = distribution.log_prob(torch.tensor(OBSERVED))
    np.testing.assert_allclose(log_prob.numpy(), scipy_log_prob(name), rtol=1e-10)


def test_lognormal_uses_the_log_prediction_when_given():
    noise = {"noise_sd": torch.tensor(0.3, dtype=torch.float64)}
    log_prediction = torch.tensor([-200.0, 0.0, 3.0], dtype=torch.float64)
    observed = np.array([1e-80, 1.0, 25.0])
    distribution = LogNormal().distribution(log_prediction.exp(), noise, log_prediction)
    expected = stats.norm.logpdf(np.log(observed), loc=log_prediction.numpy(), scale=0.3)
    expected -= np.log(observed)
    log_prob = distribution.log_prob(torch.tensor(observed))
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-10)
    # Without it, the log of an underflowed float32 prediction is floored, far from the truth.
    floored = LogNormal().distribution(log_prediction.float().exp(), noise)
    assert floored.loc[0] > -100


@pytest.mark.parametrize("name", ["normal", "proportional", "combined", "power"])
def test_other_models_accept_and_ignore_the_log_prediction(name):
    model = observation_model(name)
    noise = {k: torch.tensor(v, dtype=torch.float64) for k, v in NOISE.items()}
    prediction = torch.tensor(PREDICTION)
    with_log = model.distribution(prediction, noise, log_prediction=prediction.log())
    without = model.distribution(prediction, noise)
    observed = torch.tensor(OBSERVED)
    torch.testing.assert_close(with_log.log_prob(observed), without.log_prob(observed))


@pytest.mark.parametrize(
    "name, sites",
    [
        ("normal", ["noise_sd"]),
        ("lognormal", ["noise_sd"]),
        ("proportional", ["noise_cv"]),
        ("combined", ["noise_sd", "noise_cv"]),
        ("power", ["noise_sd", "noise_power"]),
    ],
)
def test_sample_noise_sites_are_scalar_population_sites(name, sites):
    model = observation_model(name)
    trace = poutine.trace(model.sample_noise).get_trace()
    sampled = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert sampled == sites
    for site in sites:
        assert trace.nodes[site]["value"].shape == ()
        assert trace.nodes[site]["cond_indep_stack"] == ()


def test_noise_prior_scales_are_passed_through():
    model = observation_model("normal", noise_scale=7.0)
    assert model == Normal(noise_scale=7.0)
    trace = poutine.trace(model.sample_noise).get_trace()
    assert trace.nodes["noise_sd"]["fn"].scale == 7.0


def test_scales_stay_valid_where_the_prediction_underflows():
    zero = torch.zeros(3)
    noise = {k: torch.tensor(v) for k, v in NOISE.items()}
    for model in (LogNormal(), Proportional(), Combined(), Power()):
        log_prob = model.distribution(zero, noise).log_prob(torch.full((3,), 0.5))
        assert not torch.isnan(log_prob).any(), model.name


def test_registry_and_unknown_name():
    assert set(OBSERVATION_MODELS) == {
        "normal",
        "lognormal",
        "proportional",
        "combined",
        "power",
        "student_t",
        "log_student_t",
        "poisson",
        "negative_binomial",
        "bernoulli",
        "binomial",
        "ordinal",
    }
    assert isinstance(observation_model("power"), Power)
    custom = Combined(noise_scale=2.0)
    assert observation_model(custom) is custom
    with pytest.raises(ValueError, match="unknown likelihood 'gamma'.*normal"):
        observation_model("gamma")
    assert observation_model("ordinal:4") == Ordinal(4)
    with pytest.raises(ValueError, match="number of categories, e.g. 'ordinal:5'"):
        observation_model("ordinal")
    with pytest.raises(ValueError, match="takes no argument"):
        observation_model("poisson:3")
    with pytest.raises(ValueError, match="n_categories >= 2"):
        observation_model("ordinal:1")
