"""The orange and soybean reference models: trace shapes, the variety plate at dim -4, N/B
scaling, and the whole log-density computed by hand on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import load_data
from pyro_nlme.infer.util import model_structure
from pyro_nlme_models.orange import orange
from pyro_nlme_models.soybean import soybean


def sample_values(trace) -> dict[str, torch.Tensor]:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def shapes(trace) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in sample_values(trace).items()}


@pytest.mark.parametrize("subsample_size", [None, 2])
def test_orange_shapes(orange_data, subsample_size):
    batch = subsample_size or 5
    trace = poutine.trace(orange).get_trace(orange_data, subsample_size=subsample_size)
    assert shapes(trace) == {
        "asymptote": (),
        "inflection": (),
        "scale": (),
        "asymptote_sd": (),
        "noise_sd": (),
        "asymptote_effect": (batch, 1, 1, 1),
        "curve": (batch, 1, 1, 7),
        "obs": (batch, 1, 1, 7),
    }
    frames = {f.name: f.dim for f in trace.nodes["asymptote_effect"]["cond_indep_stack"]}
    assert frames == {"variety": -4}
    structure = model_structure(orange, orange_data)
    assert set(structure.individual) == {"asymptote_effect"}
    assert set(structure.population) == {
        "asymptote",
        "inflection",
        "scale",
        "asymptote_sd",
        "noise_sd",
    }


@pytest.mark.parametrize("subsample_size", [None, 12])
def test_soybean_shapes(soybean_data, subsample_size):
    batch = subsample_size or 48
    trace = poutine.trace(soybean).get_trace(soybean_data, subsample_size=subsample_size)
    assert shapes(trace) == {
        "intercept": (3,),
        "covariate_effect": (3, 3),
        "random_effect_sd": (3,),
        "random_effect_corr": (3, 3),
        "noise_sd": (),
        "noise_power": (),
        "random_effect": (batch, 1, 1, 1, 3),
        "curve": (batch, 1, 1, 10),
        "obs": (batch, 1, 1, 10),
    }
    frames = {f.name: f.dim for f in trace.nodes["random_effect"]["cond_indep_stack"]}
    assert frames == {"variety": -4}
    assert torch.isfinite(trace.log_prob_sum())


@pytest.fixture
def tiny_orange():
    """2 trees x 1 scenario x 1 plant x 3 ages, one value missing."""
    frame = pd.DataFrame(
        {
            "Tree": ["a", "a", "a", "b", "b", "b"],
            "age": [100, 500, 900, 100, 500, 900],
            "circumference": [30.0, 80.0, 120.0, 25.0, np.nan, 140.0],
        }
    )
    return load_data(frame, columns="variety=Tree,time=age,value=circumference")


def orange_log_density(data, v: dict[str, torch.Tensor], rows=None) -> dict[str, torch.Tensor]:
    """Every term of the orange model's log-density, written from its docstring."""
    value_max, time_min, span = 140.0, 100.0, 800.0
    terms = {
        "asymptote": td.Normal(value_max, 10 * value_max).log_prob(v["asymptote"]),
        "inflection": td.Normal(time_min + span / 2, 10 * span).log_prob(v["inflection"]),
        "scale": td.LogNormal(math.log(span / 8), 3.0).log_prob(v["scale"]),
        "asymptote_sd": td.HalfCauchy(value_max).log_prob(v["asymptote_sd"]),
        "noise_sd": td.HalfCauchy(value_max / 10).log_prob(v["noise_sd"]),
        "asymptote_effect": td.Normal(0.0, v["asymptote_sd"]).log_prob(v["asymptote_effect"]).sum(),
    }
    rows = torch.arange(data.n_varieties) if rows is None else rows
    effect = v["asymptote_effect"].reshape(-1)
    times, values, mask = data.times[rows, 0, 0], data.values[rows, 0, 0], data.mask[rows, 0, 0]
    curve = (v["asymptote"] + effect[:, None]) / (
        1 + torch.exp((v["inflection"] - times) / v["scale"])
    )
    log_prob = td.Normal(curve, v["noise_sd"]).log_prob(values)
    terms["obs"] = log_prob[mask].sum()
    terms["curve"] = curve
    return terms


def test_orange_log_density_by_hand(tiny_orange):
    data = tiny_orange
    assert tuple(data.times.shape) == (2, 1, 1, 3)
    assert int(data.mask.sum()) == 5
    trace = poutine.trace(orange).get_trace(data)
    trace.compute_log_prob()
    hand = orange_log_density(data, sample_values(trace))
    torch.testing.assert_close(trace.nodes["curve"]["value"][:, 0, 0], hand.pop("curve"))
    for name, term in hand.items():
        torch.testing.assert_close(trace.nodes[name]["log_prob_sum"], term, msg=name)
    torch.testing.assert_close(trace.log_prob_sum(), sum(hand.values()))


def test_orange_log_density_at_chosen_values(tiny_orange):
    """The same, at fixed latent values (not prior draws), conditioning the model."""
    chosen = {
        "asymptote": torch.tensor(150.0),
        "inflection": torch.tensor(600.0),
        "scale": torch.tensor(300.0),
        "asymptote_sd": torch.tensor(20.0),
        "noise_sd": torch.tensor(6.0),
        "asymptote_effect": torch.tensor([-5.0, 10.0]).reshape(2, 1, 1, 1),
    }
    trace = poutine.trace(poutine.condition(orange, data=chosen)).get_trace(tiny_orange)
    hand = orange_log_density(tiny_orange, chosen)
    hand.pop("curve")
    torch.testing.assert_close(trace.log_prob_sum(), sum(hand.values()))


def test_orange_subsampling_scales_by_n_over_b(orange_data):
    trace = poutine.trace(orange).get_trace(orange_data, subsample_size=2)
    rows = trace.nodes["variety"]["value"]
    v = sample_values(trace)
    value_max, time_min, span = 214.0, 118.0, 1582.0 - 118.0
    population = (
        td.Normal(value_max, 10 * value_max).log_prob(v["asymptote"])
        + td.Normal(time_min + span / 2, 10 * span).log_prob(v["inflection"])
        + td.LogNormal(math.log(span / 8), 3.0).log_prob(v["scale"])
        + td.HalfCauchy(value_max).log_prob(v["asymptote_sd"])
        + td.HalfCauchy(value_max / 10).log_prob(v["noise_sd"])
    )
    effect = v["asymptote_effect"].reshape(-1)
    individual = td.Normal(0.0, v["asymptote_sd"]).log_prob(effect).sum()
    times, values = orange_data.times[rows, 0, 0], orange_data.values[rows, 0, 0]
    curve = (v["asymptote"] + effect[:, None]) / (
        1 + torch.exp((v["inflection"] - times) / v["scale"])
    )
    likelihood = td.Normal(curve, v["noise_sd"]).log_prob(values).sum()
    expected = population + 5 / 2 * (individual + likelihood)
    torch.testing.assert_close(trace.log_prob_sum(), expected)


def test_soybean_log_likelihood_by_hand(soybean_data):
    data = soybean_data
    corr = torch.linalg.cholesky(
        torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 1.0]])
    )
    population = {
        "intercept": torch.tensor([math.log(20.0), 55.0, math.log(8.0)]),
        "covariate_effect": torch.tensor([[0.2, -2.0, 0.1], [0.1, 3.0, 0.0], [-0.3, 1.0, 0.05]]),
        "random_effect_sd": torch.tensor([0.3, 4.0, 0.1]),
        "random_effect_corr": corr,
        "noise_sd": torch.tensor(0.3),
        "noise_power": torch.tensor(0.8),
    }
    trace = poutine.trace(poutine.condition(soybean, data=population)).get_trace(data)
    trace.compute_log_prob()
    v = sample_values(trace)
    phi = v["intercept"] + data.covariate_design @ v["covariate_effect"]  # [V, 3]
    phi = phi + v["random_effect"].reshape(48, 3)
    times = data.times[:, 0, 0]
    curve = phi[:, :1].exp() / (1 + torch.exp((phi[:, 1:2] - times) / phi[:, 2:].exp()))
    torch.testing.assert_close(trace.nodes["curve"]["value"][:, 0, 0], curve)
    sd = v["noise_sd"] * curve.abs() ** v["noise_power"]
    mask = data.mask[:, 0, 0]
    log_prob = td.Normal(curve[mask], sd[mask]).log_prob(data.values[:, 0, 0][mask]).sum()
    assert torch.isfinite(log_prob)
    torch.testing.assert_close(trace.nodes["obs"]["log_prob_sum"], log_prob, rtol=1e-5, atol=1e-3)
    covariance = (
        torch.diag(v["random_effect_sd"])
        @ (v["random_effect_corr"] @ v["random_effect_corr"].T)
        @ torch.diag(v["random_effect_sd"])
    )
    random = td.MultivariateNormal(torch.zeros(3), covariance).log_prob(
        v["random_effect"].reshape(48, 3)
    )
    torch.testing.assert_close(
        trace.nodes["random_effect"]["log_prob_sum"], random.sum(), rtol=1e-4, atol=1e-2
    )


def test_soybean_covariates_shift_the_curves(soybean_data):
    """With every random effect 0 and a covariate effect on the asymptote only for Variety P,
    P plots reach exp(1) times the asymptote of F plots."""
    effect = torch.zeros(3, 3)
    effect[0, 0] = 1.0
    chosen = {
        "intercept": torch.tensor([math.log(20.0), 50.0, math.log(8.0)]),
        "covariate_effect": effect,
        "random_effect": torch.zeros(48, 1, 1, 1, 3),
    }
    trace = poutine.trace(poutine.condition(soybean, data=chosen)).get_trace(soybean_data)
    plateau = trace.nodes["curve"]["value"][:, 0, 0, 0] / torch.sigmoid(
        (soybean_data.times[:, 0, 0, 0] - 50.0) / 8.0
    )
    is_p = soybean_data.covariate_design[:, 0] == 1
    torch.testing.assert_close(plateau[is_p], torch.full((24,), 20.0 * math.e))
    torch.testing.assert_close(plateau[~is_p], torch.full((24,), 20.0))
