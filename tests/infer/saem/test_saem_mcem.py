"""MCEM on Orange reaches the exact maximum likelihood."""

import pytest

from pyro_nlme.infer.saem import MCEMConfig, fit_mcem
from pyro_nlme_models.orange import orange

PARAMETERS = ("asymptote", "inflection", "scale", "asymptote_sd", "noise_sd")


@pytest.mark.slow
def test_orange_mcem_reaches_exact_mle(orange_data, orange_exact):
    config = MCEMConfig(
        iterations=20,
        initial_samples=2,
        final_samples=50,
        growth=1.4,
        chains=100,
        conditional_iterations=20,
        progress=False,
    )
    result = fit_mcem(orange, orange_data, config)
    table = result.population_summary.set_index("parameter")
    assert result.engine == "mcem"
    assert abs(table.attrs["-2LL"] - orange_exact.minus_two_log_likelihood) < 0.05
    for name in PARAMETERS:
        se = orange_exact.standard_error[name]
        assert abs(table.loc[name, "estimate"] - orange_exact.estimate[name]) < 0.05 * se, name
        assert abs(table.loc[name, "se"] / se - 1) < 0.10, name
