"""Genomic prediction of new varieties from a fit's population posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_nlme.data import DataError, load_data
from pyro_nlme.infer.predict import predict_new_varieties
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was


@pytest.fixture(scope="module")
def fitted_and_new():
    sim = simulate_design(DesignConfig(n_varieties=12, n_heldout=3, n_markers=60, n_days=8), 7)
    genotypes = sim.genotype_table()
    heldout = sim.truth["heldout"].values
    train = genotypes[~heldout]
    new = genotypes[heldout]
    data = load_data(sim.phenotypes, markers=train)
    config = SVIConfig(batch_size=4, max_steps=15, stopping=None, progress=False, num_draws=6)
    return fit_svi(g2was, data, config).inference_data, new, data


def test_prediction_has_the_fits_design_and_uses_the_training_standardisation(fitted_and_new):
    fit, new, data = fitted_and_new
    prediction = predict_new_varieties(fit, new, seed=1)
    curve = prediction.posterior["curve"]
    assert curve.dims == ("chain", "draw", "variety", "scenario", "plant", "time")
    assert list(curve["variety"].values) == list(new["variety"])
    assert curve.shape[3:] == (data.n_scenarios, data.n_plants, data.n_times)
    assert "log_likelihood" not in prediction.groups()
    # Same population draws: the genetic part of a new variety is Z_new @ marker_effect with Z
    # standardised by the training moments, stored with the fit.
    np.testing.assert_allclose(
        prediction.constant_data["marker_mean"].values, fit.constant_data["marker_mean"].values
    )
    np.testing.assert_array_equal(
        prediction.posterior["marker_effect"].values, fit.posterior["marker_effect"].values
    )
    assert np.isfinite(curve.values).all() and (curve.values > 0).all()


def test_prediction_needs_the_fits_markers(fitted_and_new):
    fit, new, _ = fitted_and_new
    with pytest.raises(DataError, match="missing"):
        predict_new_varieties(fit, new.drop(columns=new.columns[5]))


def test_prediction_is_reproducible(fitted_and_new):
    fit, new, _ = fitted_and_new
    first = predict_new_varieties(fit, new, seed=3).posterior["curve"].values
    second = predict_new_varieties(fit, new, seed=3).posterior["curve"].values
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(second))


def test_kinship_form_fit_carries_marker_effects_for_prediction():
    sim = simulate_design(DesignConfig(n_varieties=12, n_heldout=3, n_markers=60, n_days=8), 8)
    genotypes = sim.genotype_table()
    heldout = sim.truth["heldout"].values
    data = load_data(sim.phenotypes, markers=genotypes[~heldout])
    config = SVIConfig(batch_size=4, max_steps=15, stopping=None, progress=False, num_draws=4)
    fit = fit_svi(g2was, data, config, model_kwargs={"marker_form": "kinship"}).inference_data
    posterior = fit.posterior
    # Back-solved effects reproduce every draw's genetic values: Z Z^T K^+ g / M = g.
    for draw in range(4):
        effects = torch.as_tensor(posterior["marker_effect"].values[0, draw])
        np.testing.assert_allclose(
            data.markers.standardized_matmul(effects).numpy(),
            posterior["genetic_value"].values[0, draw],
            atol=1e-4,
        )
    prediction = predict_new_varieties(fit, genotypes[heldout])
    assert prediction.posterior["curve"].sizes["variety"] == 3
