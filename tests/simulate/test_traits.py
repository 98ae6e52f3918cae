"""Trait types of the simulator: each matches its observation model (frequencies against the
model's probabilities within Monte-Carlo error), loads with its columns, and is reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_nlme.data import load_data
from pyro_nlme.model.observations import observation_model
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme.simulate.phenotypes import observe_trait

CURVE = np.array([1.0, 20.0, 80.0, 150.0])
"""Noise-free biomass (g) at four images."""
N_DRAWS = 20_000
Z_MAX = 4.0
OPTIONS = dict(
    noise_sd=0.3,
    missing_rate=0.0,
    per_gram=0.05,
    count_overdispersion=0.2,
    n_trials=6,
    cutpoints=(1.0, 3.0, 5.0),
    detection_limit=15.0,
)


def draws(trait: str, **options) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    curve = np.broadcast_to(CURVE, (N_DRAWS, CURVE.size))
    return observe_trait(rng, curve, trait, **(OPTIONS | options))


def model_probs(likelihood: str, support: np.ndarray, **noise) -> np.ndarray:
    """``P(y = k)`` of the observation model at ``f = per_gram * CURVE``, ``[k, image]``."""
    f = torch.tensor(OPTIONS["per_gram"] * CURVE, dtype=torch.float64)
    noise = {k: torch.tensor(v, dtype=torch.float64) for k, v in noise.items()}
    distribution = observation_model(likelihood).distribution(f, noise)
    if likelihood == "binomial":
        distribution = torch.distributions.Binomial(OPTIONS["n_trials"], logits=distribution.logits)
    values = torch.tensor(support, dtype=torch.float64)[:, None].expand(-1, CURVE.size)
    return distribution.log_prob(values).exp().numpy()


def assert_frequencies(values: np.ndarray, support: np.ndarray, probs: np.ndarray) -> None:
    """Each category's frequency within Z_MAX binomial SDs of its probability."""
    for k, p in zip(support, probs, strict=True):
        frequency = (values == k).mean(0)
        sd = np.sqrt(np.maximum(p * (1 - p), 1e-12) / N_DRAWS)
        assert (np.abs(frequency - p) / sd).max() < Z_MAX, (k, frequency, p)


@pytest.mark.parametrize(
    "trait, likelihood, support, noise",
    [
        ("count", "negative_binomial", np.arange(25), {"noise_overdispersion": 0.2}),
        ("binary", "bernoulli", np.arange(2), {}),
        ("binomial", "binomial", np.arange(7), {}),
        ("ordinal", "ordinal:4", np.arange(4), {"noise_cutpoints": [1.0, 3.0, 5.0]}),
    ],
)
def test_discrete_traits_follow_their_observation_model(trait, likelihood, support, noise):
    recorded = draws(trait)
    assert_frequencies(recorded["value"], support, model_probs(likelihood, support, **noise))
    if trait == "binomial":
        assert (recorded["trials"] == OPTIONS["n_trials"]).all()


def test_poisson_counts_without_overdispersion():
    values = draws("count", count_overdispersion=0.0)["value"]
    support = np.arange(25)
    assert_frequencies(values, support, model_probs("poisson", support))


def test_censored_trait_records_the_detection_limit():
    recorded = draws("censored")
    below = stats.norm.cdf(np.log(15.0), np.log(CURVE), 0.3)
    censored = recorded["cens"] == 1
    sd = np.sqrt(below * (1 - below) / N_DRAWS) + 1e-12
    assert (np.abs(censored.mean(0) - below) / sd).max() < Z_MAX
    assert (recorded["value"][censored] == 15.0).all()
    assert (recorded["value"][~censored] >= 15.0).all()


def test_missing_images_and_unknown_trait():
    values = draws("count", missing_rate=0.3)["value"]
    assert 0.28 < np.isnan(values).mean() < 0.32
    with pytest.raises(ValueError, match="unknown trait 'height'"):
        draws("height")
    with pytest.raises(ValueError, match="trait in"):
        DesignConfig(trait="height")


SMALL = DesignConfig(n_varieties=6, n_markers=120, n_chromosomes=2, n_qtl=2, n_shared_qtl=1)


@pytest.mark.parametrize(
    "trait, columns", [("binomial", ["trials"]), ("censored", ["cens"]), ("ordinal", [])]
)
def test_simulated_traits_load_with_their_columns(trait, columns):
    simulated = simulate_design(dataclasses.replace(SMALL, trait=trait), seed=1)
    frame = simulated.phenotypes
    assert list(frame.columns) == ["variety", "scenario", "plant", "time", "value", *columns]
    data = load_data(frame)
    if trait == "censored":
        assert data.summary.n_left_censored == int((frame["cens"] == 1).sum()) > 0
    if trait == "binomial":
        assert data.trials.max() == SMALL.n_trials
    same_curves = simulate_design(SMALL, seed=1).truth["noise_free_curve"]
    np.testing.assert_array_equal(simulated.truth["noise_free_curve"], same_curves)
