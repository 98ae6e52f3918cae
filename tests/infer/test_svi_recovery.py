"""SVI recovers a small simulated design (slow: a few minutes; run by CI with ``-m slow``).

One fit, the configuration the README uses (kinship form, centred with the genetic components
non-centred, amortised guide anchored at the conditional modes, one Gaussian over the plants
of each variety x scenario and that level drawn from its exact conditional), checked against
the simulator's truth with tolerances from the posterior SDs.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyro_nlme.data import load_data
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recovery_fit():
    sim = simulate_design(DesignConfig(n_varieties=60, n_markers=500), seed=11)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    result = fit_svi(
        g2was,
        data,
        SVIConfig(
            batch_size=20,
            max_steps=3000,
            lr=0.02,
            noncentred_sites=("genetic_value_component",),
            correlated_events=True,
            correlated_plates=("plant",),
            exact_levels=("variety_scenario_parameter",),
            progress=False,
            num_draws=200,
        ),
        model_kwargs={"marker_form": "kinship", "parametrization": "centred"},
    )
    return sim, data, result.inference_data.posterior


def test_amortized_svi_recovers_curves_and_scenario_means(recovery_fit):
    """Measured 2026-11-27 (ninth session): largest |z| of a scenario mean 1.37 (2.03 with the
    diagonal individual level)."""
    sim, data, posterior = recovery_fit
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


def test_amortized_svi_recovers_the_noise_sd(recovery_fit):
    """The multiplicative noise SD is estimated from ~7,500 values: within 4 posterior SDs.

    Measured 2026-11-27 (ninth session): 0.0804 (SD 0.0006), 0.7 SDs. With the diagonal
    individual level: 0.0818, 2.6 SDs; before the amortised guide scaled its coupling to the
    population draws by each coordinate's prior share of precision: 0.0841, 4.2 SDs
    (docs/svi.md)."""
    sim, _, posterior = recovery_fit
    noise = posterior["noise_sd"].values.ravel()
    truth = float(sim.truth["noise_sd"])
    assert abs(noise.mean() - truth) < 4 * noise.std(), (noise.mean(), noise.std(), truth)


def test_amortized_svi_recovers_the_variance_components(recovery_fit):
    """Genetic, variety x scenario and plant SDs, each within 4 posterior SDs of the truth.

    Measured 2026-11-27: |z| 0.6-1.1 for the variety x scenario and plant SDs, 1.6-2.4 for the
    genetic SDs (whose mean-field posterior SDs are about half NUTS's, docs/svi.md). With the
    diagonal individual level this fit put the plant SD of the inflection at 0.242 (truth 0.3,
    posterior SD about 0.006; docs/svi.md), which fails this check."""
    sim, _, posterior = recovery_fit
    for name in ("genetic_sd", "variety_scenario_sd", "plant_sd"):
        draws = posterior[name]
        z = (draws.mean(("chain", "draw")).values - sim.truth[name].values) / draws.std(
            ("chain", "draw")
        ).values
        assert np.abs(z).max() < 4, (name, z)
