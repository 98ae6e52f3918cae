"""Manhattan plot: per-marker statistics from a fit's posterior, genome positions, the figure."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
import xarray as xr

from pyro_nlme.diagnostics.manhattan import genome_positions, marker_statistic, plot_manhattan
from pyro_nlme.export import GUIDE_MEAN

MARKERS = ["chr01_000001", "chr01_000002", "chr02_000001", "chr02_000002", "chr02_000003"]
PARAMETERS = ["log_asymptote", "log_rate", "inflection"]


def fake_fit(rng) -> az.InferenceData:
    dims = ("chain", "draw", "marker", "curve_parameter")
    coords = {"marker": MARKERS, "curve_parameter": PARAMETERS}
    return az.InferenceData(
        posterior=xr.Dataset(
            {
                "marker_effect": (dims, rng.normal(size=(1, 4, 5, 3))),
                "marker_effect_inclusion_probability": (dims, rng.uniform(size=(1, 4, 5, 3))),
            },
            coords=coords,
        )
    )


def test_statistics_are_posterior_means():
    idata = fake_fit(np.random.default_rng(0))
    posterior = idata.posterior
    pip = marker_statistic(idata, "pip")
    np.testing.assert_allclose(
        pip.values, posterior["marker_effect_inclusion_probability"].values.mean((0, 1))
    )
    effect = marker_statistic(idata, "effect")
    np.testing.assert_allclose(
        effect.values, np.abs(posterior["marker_effect"].values.mean((0, 1)))
    )
    assert pip.dims == ("marker", "curve_parameter")
    ridge = az.InferenceData(posterior=posterior[["marker_effect"]])
    with pytest.raises(ValueError, match="spike_slab"):
        marker_statistic(ridge, "pip")


def test_effect_statistic_prefers_the_guide_mean():
    """A fit with closed-form means (``guide_mean``) is ranked by them, not by its draws."""
    idata = fake_fit(np.random.default_rng(1))
    exact = np.random.default_rng(2).normal(size=(5, 3))
    coords = {"marker": MARKERS, "curve_parameter": PARAMETERS}
    idata.add_groups(
        {
            GUIDE_MEAN: xr.Dataset(
                {"marker_effect": (("marker", "curve_parameter"), exact)}, coords=coords
            )
        }
    )
    np.testing.assert_allclose(marker_statistic(idata, "effect").values, np.abs(exact))


def test_genome_positions_from_ids_or_file_order():
    chromosome, position = genome_positions(MARKERS)
    np.testing.assert_array_equal(chromosome, [1, 1, 2, 2, 2])
    np.testing.assert_array_equal(position, [1, 2, 1, 2, 3])
    chromosome, position = genome_positions(["a", "b"])
    np.testing.assert_array_equal(chromosome, [1, 1])
    np.testing.assert_array_equal(position, [1, 2])


def test_plot_has_one_panel_per_curve_parameter():
    import matplotlib

    matplotlib.use("Agg")
    idata = fake_fit(np.random.default_rng(1))
    highlight = np.zeros((5, 3), dtype=bool)
    highlight[2] = True
    figure = plot_manhattan(marker_statistic(idata, "pip"), highlight=highlight, ylabel="PIP")
    axes = figure.get_axes()
    assert [a.get_title(loc="left") for a in axes] == PARAMETERS
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == ["1", "2"]
    # every marker plotted, the highlighted one circled once per panel
    assert len(axes[0].collections[0].get_offsets()) == 5
    assert len(axes[0].collections[1].get_offsets()) == 1
