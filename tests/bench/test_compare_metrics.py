"""Scores of the method-comparison benchmark against hand-computed values."""

import numpy as np
import pandas as pd
import pytest

from benchmarks.compare import metrics as m
from benchmarks.compare.report import add_nuts_agreement, population_errors


def test_bias_and_rmse_over_replicates():
    estimate = np.array([[1.0, 10.0], [3.0, 14.0]])  # 2 replicates x 2 parameters
    truth = np.array([2.0, 10.0])
    bias, rmse = m.bias_rmse(estimate, truth)
    np.testing.assert_allclose(bias, [0.0, 2.0])
    np.testing.assert_allclose(rmse, [1.0, np.sqrt(8.0)])


def test_relative_and_standardised_rmse():
    # errors 10% and 30% of the truth: sqrt((0.01 + 0.09) / 2)
    assert m.relative_rmse([1.1, -1.3], [1.0, -1.0]) == pytest.approx(np.sqrt(0.05))
    # errors of 1 and 3 SEs: sqrt((1 + 9) / 2)
    assert m.standardised_rmse([2.0, 13.0], [1.0, 10.0], [1.0, 1.0]) == pytest.approx(np.sqrt(5))


def test_coverage_counts_bounds_as_inside_and_nan_as_outside():
    lower = [0.0, 0.0, 0.0, np.nan]
    upper = [1.0, 1.0, 1.0, np.nan]
    assert m.coverage(lower, upper, [1.0, 0.5, 2.0, 0.5]) == pytest.approx(0.5)


def test_wald_interval_is_90_percent():
    lower, upper = m.wald_interval(np.array([10.0]), np.array([2.0]))
    assert lower[0] == pytest.approx(10 - 2 * 1.6449, abs=1e-3)
    assert upper[0] == pytest.approx(10 + 2 * 1.6449, abs=1e-3)


def test_draw_summary_quantiles_and_sd():
    draws = np.arange(101.0)  # 0..100: 5% and 95% quantiles are 5 and 95
    stats = m.draw_summary(draws)
    assert stats["estimate"] == pytest.approx(50.0)
    assert stats["lower"] == pytest.approx(5.0)
    assert stats["upper"] == pytest.approx(95.0)
    assert stats["sd"] == pytest.approx(np.std(draws, ddof=1))


def test_mean_correlation_per_column():
    truth = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    predicted = np.array([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])  # r = 1 and r = -1
    assert m.mean_correlation(predicted, truth) == pytest.approx(0.0)


def test_nuts_agreement_by_hand():
    fit = pd.DataFrame({"label": ["a", "b", "c"], "estimate": [1.0, 0.0, 5.0], "sd": [1.0, 4.0, 1]})
    nuts = pd.DataFrame({"label": ["a", "b"], "estimate": [0.0, 1.0], "sd": [2.0, 2.0]})
    # z = (1 - 0) / 2 = 0.5 and (0 - 1) / 2 = -0.5; ratios 0.5 and 2; "c" has no reference
    out = m.nuts_agreement(fit, nuts)
    assert out == {
        "nuts_scalars": 2,
        "nuts_mean_abs_z": pytest.approx(0.5),
        "nuts_max_abs_z": pytest.approx(0.5),
        "nuts_median_sd_ratio": pytest.approx(1.25),
    }


def test_agreement_is_taken_against_the_nuts_cell_of_the_same_data_and_seed():
    cells = pd.DataFrame(
        {
            "key": ["svi", "nuts0", "nuts1"],
            "engine": ["svi-normal", "nuts", "nuts"],
            "dataset": ["orange"] * 3,
            "seed": [0, 0, 1],
            "status": ["ok"] * 3,
            "max_r_hat": [np.nan, 1.01, 1.0],
        }
    )
    rows = {"label": ["a"], "kind": ["population"], "sd": [1.0], "truth": [np.nan]}
    parameters = pd.concat(
        [
            pd.DataFrame({"key": "svi", "estimate": [3.0], **rows}),
            pd.DataFrame({"key": "nuts0", "estimate": [1.0], **rows}),
            pd.DataFrame({"key": "nuts1", "estimate": [100.0], **rows}),
        ]
    )
    out = add_nuts_agreement(cells, parameters).set_index("key")
    assert out.loc["svi", "nuts_mean_abs_z"] == pytest.approx(2.0)  # (3 - 1) / 1, seed 0
    assert out.loc["svi", "nuts_reference_max_r_hat"] == pytest.approx(1.01)
    assert np.isnan(out.loc["nuts0", "nuts_mean_abs_z"])  # no other NUTS cell of seed 0


def test_population_errors_over_seeds():
    parameters = pd.DataFrame(
        {
            "engine": ["saem"] * 2,
            "dataset": ["orange"] * 2,
            "label": ["noise_sd"] * 2,
            "kind": ["population"] * 2,
            "estimate": [7.0, 9.0],
            "truth": [7.5, 7.5],
            "lower": [6.0, 8.0],
            "upper": [8.0, 10.0],
        }
    )
    row = population_errors(parameters).iloc[0]
    assert row["seeds"] == 2
    assert row["bias"] == pytest.approx(0.5)
    assert row["rmse"] == pytest.approx(np.sqrt((0.25 + 2.25) / 2))
    assert row["coverage90"] == pytest.approx(0.5)


def test_an_unconverged_nuts_fit_is_no_reference():
    cells = pd.DataFrame(
        {
            "key": ["svi", "nuts", "numpyro"],
            "engine": ["svi-normal", "nuts", "numpyro-nuts"],
            "dataset": ["orange"] * 3,
            "seed": [0, 0, 0],
            "status": ["ok"] * 3,
            "max_r_hat": [np.nan, 2.5, 1.0],
        }
    )
    rows = {"label": ["a"], "kind": ["population"], "sd": [1.0], "truth": [np.nan]}
    parameters = pd.concat(
        [
            pd.DataFrame({"key": key, "estimate": [value], **rows})
            for key, value in (("svi", 3.0), ("nuts", 50.0), ("numpyro", 2.0))
        ]
    )
    out = add_nuts_agreement(cells, parameters).set_index("key")
    assert out.loc["svi", "nuts_reference"] == "numpyro-nuts"  # ours has r_hat 2.5
    assert out.loc["svi", "nuts_mean_abs_z"] == pytest.approx(1.0)
    without = add_nuts_agreement(cells[cells["key"] != "numpyro"], parameters).set_index("key")
    assert np.isnan(without.loc["svi", "nuts_mean_abs_z"])
    assert without.loc["svi", "nuts_reference_max_r_hat"] == pytest.approx(2.5)
