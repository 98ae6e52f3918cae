"""The ArviZ exporter on prior draws (g2was) and on fit-like draws (orange): groups, dims and
labels, values, az.summary / az.loo / az.plot_ppc, and a lossless netCDF round trip."""

from __future__ import annotations

import json

import arviz as az
import matplotlib
import numpy as np
import pyro
import pytest
import torch
import xarray as xr
from pyro.infer import Predictive

from pyro_nlme.data import load_data
from pyro_nlme.export import OBSERVATION_DIM, to_inference_data
from pyro_nlme.infer.util import model_structure
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import CURVE_PARAMETERS, g2was
from pyro_nlme_models.orange import orange

matplotlib.use("Agg")

N_CHAINS, N_DRAWS = 2, 10


def prior_draws(model, data, n_chains=N_CHAINS, n_draws=N_DRAWS) -> dict[str, torch.Tensor]:
    """Prior draws of every latent site, ``[chain, draw, *site shape]`` (Predictive pads the
    shapes of sites outside the plates with size-1 dims: reshape to the traced shape)."""
    structure = model_structure(model, data)
    predicted = Predictive(model, num_samples=n_chains * n_draws)(data.without_values())
    return {
        name: predicted[name].reshape((n_chains, n_draws) + info.shape)
        for name, info in structure.latent.items()
    }


@pytest.fixture(scope="module")
def small_design():
    config = DesignConfig(n_varieties=6, n_markers=40, n_days=8, missing_rate=0.1)
    simulated = simulate_design(config, seed=1)
    return load_data(simulated.phenotypes, markers=simulated.genotype_table())


@pytest.fixture(scope="module")
def g2was_idata(small_design):
    pyro.set_rng_seed(1)  # module-scoped: created before the per-test seed is set
    samples = prior_draws(g2was, small_design)
    settings = {"num_samples": N_CHAINS * N_DRAWS, "kind": "prior"}
    idata = to_inference_data(
        g2was,
        small_design,
        samples,
        engine="prior",
        settings=settings,
        seed=3,
        model_name="g2was",
    )
    return idata, samples


def test_groups(g2was_idata):
    idata, _ = g2was_idata
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }


def test_posterior_dims_and_labels(g2was_idata, small_design):
    idata, samples = g2was_idata
    data = small_design
    posterior = idata.posterior
    expected_dims = {
        "scenario_mean": ("chain", "draw", "scenario", "curve_parameter"),
        "genetic_sd": ("chain", "draw", "curve_parameter"),
        "variety_scenario_sd": ("chain", "draw", "curve_parameter"),
        "plant_sd": ("chain", "draw", "curve_parameter"),
        "noise_sd": ("chain", "draw"),
        "marker_effect": ("chain", "draw", "marker", "curve_parameter"),
        "variety_scenario_effect": ("chain", "draw", "variety", "scenario", "curve_parameter"),
        "plant_effect": ("chain", "draw", "variety", "scenario", "plant", "curve_parameter"),
        "curve": ("chain", "draw", "variety", "scenario", "plant", "time"),
    }
    assert {name: posterior[name].dims for name in posterior.data_vars} == expected_dims
    assert list(posterior["variety"].values) == data.variety_ids
    assert list(posterior["scenario"].values) == data.scenario_names
    assert list(posterior["curve_parameter"].values) == list(CURVE_PARAMETERS)
    assert list(posterior["marker"].values) == data.markers.marker_ids
    assert list(posterior["plant"].values) == [1, 2]
    assert posterior.sizes["time"] == data.n_times
    assert list(posterior["chain"].values) == [0, 1]
    assert posterior.sizes["draw"] == N_DRAWS
    np.testing.assert_array_equal(
        posterior["plant_effect"].values, samples["plant_effect"][..., 0, :].numpy()
    )
    np.testing.assert_array_equal(
        posterior["scenario_mean"].values, samples["scenario_mean"].numpy()
    )


def test_observation_groups(g2was_idata, small_design):
    idata, _ = g2was_idata
    data = small_design
    n_observed = int(data.mask.sum())
    assert n_observed < data.mask.numel()  # the design has missing images
    observed = idata.observed_data["obs"]
    assert observed.dims == (OBSERVATION_DIM,)
    np.testing.assert_array_equal(observed.values, data.values[data.mask].numpy())
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["obs"].dims == ("chain", "draw", OBSERVATION_DIM)
        assert idata[group]["obs"].shape == (N_CHAINS, N_DRAWS, n_observed)
    assert np.isfinite(idata.log_likelihood["obs"].values).all()
    assert (idata.posterior_predictive["obs"].values >= 0).all()  # log-normal draws
    constant = idata.constant_data
    frame = data.observation_frame()
    assert list(constant["obs_variety"].values) == frame["variety"].tolist()
    assert list(constant["obs_scenario"].values) == frame["scenario"].tolist()
    assert list(constant["obs_plant"].values) == frame["plant"].tolist()
    np.testing.assert_array_equal(constant["obs_time"].values, frame["time"].to_numpy())
    np.testing.assert_array_equal(constant["mask"].values, data.mask.numpy())
    assert constant["times"].dims == ("variety", "scenario", "plant", "time")


def test_log_likelihood_matches_the_curve(g2was_idata, small_design):
    """log_likelihood[c, d, i] is the LogNormal log-density of observation i under draw (c, d)."""
    idata, samples = g2was_idata
    data = small_design
    curve = torch.as_tensor(idata.posterior["curve"].values)[..., data.mask]
    noise_sd = samples["noise_sd"][..., None]
    expected = torch.distributions.LogNormal(curve.log(), noise_sd).log_prob(data.values[data.mask])
    log_likelihood = idata.log_likelihood["obs"].values
    resolved = curve.numpy() > 1e-30  # where the exported curve has not underflowed
    assert resolved.mean() > 0.9
    np.testing.assert_allclose(
        log_likelihood[resolved], expected.numpy()[resolved], rtol=1e-4, atol=1e-3
    )
    assert np.isfinite(log_likelihood).all()


def test_attrs(g2was_idata):
    idata, _ = g2was_idata
    for group in idata.groups():
        attrs = idata[group].attrs
        assert attrs["engine"] == "prior" and attrs["model"] == "g2was" and attrs["seed"] == 3
        assert json.loads(attrs["settings"]) == {"kind": "prior", "num_samples": 20}
        assert "pyro-ppl" in json.loads(attrs["versions"])


def test_summary(g2was_idata):
    idata, _ = g2was_idata
    summary = az.summary(idata, var_names=["scenario_mean", "noise_sd"], kind="stats")
    assert len(summary) == 3 * 3 + 1
    assert "scenario_mean[well_watered, log_asymptote]" in summary.index


def test_netcdf_round_trip_loses_nothing(g2was_idata, tmp_path):
    idata, _ = g2was_idata
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        original, reread = idata[group], loaded[group]
        assert set(reread.data_vars) == set(original.data_vars), group
        xr.testing.assert_equal(reread, original)
        assert dict(reread.attrs) == dict(original.attrs), group
        for name in original.variables:
            assert reread[name].dtype.kind == original[name].dtype.kind, (group, name)


# --- fit-like draws: orange, concentrated near the maximum-likelihood estimate ---------------


@pytest.fixture(scope="module")
def orange_idata(orange_data):
    """Draws near nlme's estimates (Pinheiro & Bates 2000, sec. 8.2); each tree's asymptote
    effect is its least-squares value given the population curve."""
    data = orange_data
    generator = torch.Generator().manual_seed(0)

    def around(value: float, sd: float, shape=()) -> torch.Tensor:
        noise = torch.randn((N_CHAINS, 50) + shape, generator=generator)
        return value + sd * noise

    times, values = data.times[:, 0, 0], data.values[:, 0, 0]
    shape = torch.sigmoid((times - 722.5) / 344.2)
    effect = (values * shape).sum(1) / (shape * shape).sum(1) - 191.0
    samples = {
        "asymptote": around(191.0, 2.0),
        "inflection": around(722.5, 5.0),
        "scale": around(344.2, 5.0),
        "asymptote_sd": around(31.5, 1.0),
        "noise_sd": around(7.85, 0.2),
        "asymptote_effect": (effect + around(0.0, 1.0, (5,))).reshape(N_CHAINS, 50, 5, 1, 1, 1),
    }
    return to_inference_data(orange, data, samples, engine="test", settings={}, seed=0)


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning")
def test_loo_on_fit_like_draws(orange_idata):
    loo = az.loo(orange_idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo)
    assert loo.pareto_k.shape == (35,)
    # 35 values with a residual SD of about 8 mm: about -log(8 * sqrt(2 pi e)) each.
    assert -35 * 4.5 < loo.elpd_loo < -35 * 3.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_plot_ppc(orange_idata):
    import matplotlib.pyplot as plt

    axes = az.plot_ppc(orange_idata, num_pp_samples=20, random_seed=0)
    assert np.size(axes) >= 1
    plt.close("all")


def test_orange_dims(orange_idata, orange_data):
    posterior = orange_idata.posterior
    assert posterior["asymptote_effect"].dims == ("chain", "draw", "variety")
    assert list(posterior["variety"].values) == orange_data.variety_ids
    assert posterior["asymptote"].dims == ("chain", "draw")
    assert posterior["curve"].dims == ("chain", "draw", "variety", "scenario", "plant", "time")


def prediction_idata(design, structure=None):
    pyro.set_rng_seed(2)
    samples = prior_draws(g2was, design, n_chains=1, n_draws=3)
    return to_inference_data(
        g2was,
        design.without_values(),
        samples,
        engine="prior",
        settings={},
        seed=0,
        structure=structure,
    )


def test_prediction_without_values(small_design):
    """With ``data.values`` None (prediction) there is nothing to score: no log_likelihood nor
    observed_data; the predictive covers the cells of ``data.mask``."""
    idata = prediction_idata(small_design, structure=model_structure(g2was, small_design))
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "constant_data"}
    n_observed = int(small_design.mask.sum())
    assert idata.posterior_predictive["obs"].shape == (1, 3, n_observed)
    summary = json.loads(idata.posterior.attrs["data_summary"])
    assert summary == small_design.summary.as_dict()


def test_prediction_without_values_and_without_a_structure(small_design):
    idata = prediction_idata(small_design)
    assert "log_likelihood" not in idata.groups()
