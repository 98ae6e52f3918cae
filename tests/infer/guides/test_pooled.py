"""Pooled-fit initial estimates against an exact nonlinear least-squares reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from pyro_nlme.infer.guides.pooled import pooled_estimates
from pyro_nlme.infer.util import model_structure
from pyro_nlme_models.orange import orange


def test_orange_pooled_fit_is_the_least_squares_fit_of_the_population_curve(orange_data):
    """With the random asymptote at its prior mean (0), the pooled likelihood is that of a
    fixed logistic curve with Gaussian noise: its maximum is the least-squares curve, and the
    noise SD the root mean squared residual. ``asymptote_sd`` does not enter it and is left out.
    """
    structure = model_structure(orange, orange_data)
    sites = ["asymptote", "inflection", "scale", "asymptote_sd", "noise_sd"]
    estimates = pooled_estimates(orange, orange_data, structure, sites)
    assert set(estimates) == {"asymptote", "inflection", "scale", "noise_sd"}

    observed = orange_data.mask.numpy()
    age = orange_data.times.numpy()[observed].astype(float)
    circumference = orange_data.values.numpy()[observed].astype(float)

    def residuals(p):
        return p[0] / (1 + np.exp((p[1] - age) / p[2])) - circumference

    exact = scipy.optimize.least_squares(residuals, (200.0, 700.0, 350.0), method="lm")
    rms = np.sqrt(np.mean(exact.fun**2))
    found = [float(estimates[name]) for name in ("asymptote", "inflection", "scale")]
    assert found == pytest.approx(exact.x, rel=1e-3)
    assert float(estimates["noise_sd"]) == pytest.approx(rms, rel=1e-3)
