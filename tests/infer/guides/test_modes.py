"""Conditional modes and Laplace SDs of the individual latents, against closed forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import init_to_value

from pyro_nlme.data import load_data
from pyro_nlme.infer.guides.init import init_to_prior_median
from pyro_nlme.infer.guides.modes import conditional_modes
from pyro_nlme.infer.util import model_structure
from pyro_nlme.model import (
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)

EFFECT_SD, PRIOR_SD = 1.5, 10.0


@nlme_model()
def centred_intercept(data, subsample_size=None):
    """``y[v, t] ~ Normal(level[v], noise_sd)``, ``level[v] ~ Normal(mean, EFFECT_SD)``,
    ``mean ~ Normal(0, PRIOR_SD)``, ``noise_sd ~ HalfNormal(1)`` (a scale: held fixed)."""
    mean = pyro.sample("mean", dist.Normal(0.0, PRIOR_SD))
    noise_sd = pyro.sample("noise_sd", dist.HalfNormal(1.0))
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        level = pyro.sample("level", dist.Normal(mean, EFFECT_SD))
        with scenario_plate(data), plant_plate(data), time_plate(data):
            return observe(batch, dist.Normal(level, noise_sd))


@pytest.fixture(scope="module")
def unbalanced_data():
    """12 varieties with 1 to 12 observations each, and one variety with none."""
    rng = np.random.default_rng(5)
    rows = [
        {"variety": f"v{v:02d}", "time": float(t), "value": 3.0 + v / 4 + rng.standard_normal()}
        for v in range(12)
        for t in range(v + 1)
    ]
    rows.append({"variety": "v99", "time": 0.0, "value": np.nan})
    return load_data(pd.DataFrame(rows))


def test_modes_and_laplace_sds_are_the_penalised_least_squares_solution(unbalanced_data):
    """With ``noise_sd`` held at 0.7 the log density is quadratic in ``(mean, level)``: the joint
    mode solves a linear system, and each variety's Laplace SD given ``mean`` is
    ``(n_v / noise_sd^2 + 1 / EFFECT_SD^2)^(-1/2)``, its conditional precision the inverse
    square."""
    noise_sd = 0.7
    structure = model_structure(centred_intercept, unbalanced_data)
    init = init_to_value(values={"noise_sd": torch.tensor(noise_sd)}, fallback=init_to_prior_median)
    population, individual = conditional_modes(centred_intercept, unbalanced_data, structure, init)

    values = unbalanced_data.values.double().reshape(unbalanced_data.n_varieties, -1)
    mask = unbalanced_data.mask.reshape(unbalanced_data.n_varieties, -1)
    n = mask.sum(-1).double()
    total = torch.where(mask, values, 0.0).sum(-1)
    # Unknowns (mean, level_1..V): normal equations of the quadratic.
    n_varieties = len(n)
    precision = torch.zeros(n_varieties + 1, n_varieties + 1, dtype=torch.float64)
    precision[0, 0] = 1 / PRIOR_SD**2 + n_varieties / EFFECT_SD**2
    precision[0, 1:] = precision[1:, 0] = -1 / EFFECT_SD**2
    precision[1:, 1:] = torch.diag(n / noise_sd**2 + 1 / EFFECT_SD**2)
    rhs = torch.cat([torch.zeros(1, dtype=torch.float64), total / noise_sd**2])
    exact = torch.linalg.solve(precision, rhs)

    assert set(population) == {"mean"} and set(individual) == {"level"}
    assert population["mean"].item() == pytest.approx(exact[0].item(), abs=1e-4)
    level, level_sd, level_precision = individual["level"]
    torch.testing.assert_close(level.double().flatten(), exact[1:], rtol=0, atol=1e-4)
    expected_sd = (n / noise_sd**2 + 1 / EFFECT_SD**2).rsqrt()
    torch.testing.assert_close(level_sd.double().flatten(), expected_sd, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        level_precision.double().flatten(), expected_sd**-2, rtol=1e-4, atol=0
    )
    # The variety without data sits at its conditional prior: mode = mean, SD = EFFECT_SD.
    assert level_sd.flatten()[-1].item() == pytest.approx(EFFECT_SD, rel=1e-4)


@nlme_model()
def common_level(data, subsample_size=None):
    """``y[v, t] ~ Normal(mean, 1)``: no individual latent."""
    mean = pyro.sample("mean", dist.Normal(0.0, PRIOR_SD))
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        with scenario_plate(data), plant_plate(data), time_plate(data):
            return observe(batch, dist.Normal(mean, 1.0))


def test_a_model_without_individual_latents_gets_its_population_mode(unbalanced_data):
    structure = model_structure(common_level, unbalanced_data)
    population, individual = conditional_modes(
        common_level, unbalanced_data, structure, init_to_prior_median
    )
    values = unbalanced_data.values[unbalanced_data.mask].double()
    exact = values.sum() / (len(values) + 1 / PRIOR_SD**2)
    assert individual == {}
    assert population["mean"].item() == pytest.approx(exact.item(), abs=1e-4)
