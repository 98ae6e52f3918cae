"""SVI recovers a small simulated design (slow: a few minutes; run by CI with ``-m slow``)."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_nlme.data import load_data
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="open (issue 3), measured 2026-11-26 after the pooled init and the coupled guide: "
    "curve R^2 passes, scenario means at most 4.0 posterior SDs off (were 5 to 42), but the "
    "noise SD is 0.148 against 0.08 (27 SDs) and the genetic SDs of the effects form collapse "
    "(0.07 / 0.05 / 0.17 against 0.25 / 0.15 / 1.0): variance components not converged in "
    "3,000 steps; strict, so a fix makes CI say so",
)
def test_amortized_svi_recovers_curves_and_scenario_means():
    sim = simulate_design(DesignConfig(n_varieties=60, n_markers=500), seed=11)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    result = fit_svi(
        g2was,
        data,
        SVIConfig(batch_size=20, max_steps=3000, lr=0.02, progress=False, num_draws=200),
    )
    posterior = result.inference_data.posterior
    truth = sim.truth

    curve = posterior["curve"].mean(("chain", "draw")).values[data.plant_mask.numpy()]
    true_curve = truth["noise_free_curve"].values[data.plant_mask.numpy()]
    r2 = 1 - ((curve - true_curve) ** 2).sum() / ((true_curve - true_curve.mean()) ** 2).sum()
    assert r2 >= 0.95

    # Scenario means: each within 4 posterior SDs of the truth (|z| > 4 has probability 6e-5
    # per parameter for a calibrated posterior; 9 parameters).
    means = posterior["scenario_mean"]
    z = (means.mean(("chain", "draw")).values - truth["scenario_mean"].values) / means.std(
        ("chain", "draw")
    ).values
    assert np.abs(z).max() < 4, z

    # The multiplicative noise SD is estimated from ~7,500 values: within 4 posterior SDs.
    noise = posterior["noise_sd"].values.ravel()
    assert abs(noise.mean() - float(truth["noise_sd"])) < 4 * noise.std()
