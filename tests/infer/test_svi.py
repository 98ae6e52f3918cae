"""SVI engine: unbiased minibatch ELBO, export schema, resume, non-finite stops, guides."""

from __future__ import annotations

import dataclasses
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import Trace_ELBO

from pyro_nlme.data import load_data
from pyro_nlme.infer.guides import build_guide
from pyro_nlme.infer.guides.amortized import ENCODER, MARKER_LAYER
from pyro_nlme.infer.stopping import PlateauRule
from pyro_nlme.infer.svi import NonFiniteError, SVIConfig, fit_svi, noncentred
from pyro_nlme.infer.util import model_structure
from pyro_nlme.model import observe, plant_plate, scenario_plate, time_plate, variety_plate
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was

QUICK = dict(stopping=None, progress=False, num_draws=8)


@pytest.fixture(scope="module")
def tiny():
    """12 varieties x 3 scenarios x 2 plants x 8 days, 60 markers."""
    sim = simulate_design(DesignConfig(n_varieties=12, n_markers=60, n_days=8), seed=5)
    return load_data(sim.phenotypes, markers=sim.genotype_table())


@pytest.mark.parametrize("guide_kind", ["amortized", "normal"])
def test_subsampled_elbo_is_unbiased(tiny, guide_kind):
    """Minibatch and full-data ELBO estimates of the same guide have the same expectation
    (the N/B scaling); 400 estimates each, difference within 4 Monte-Carlo SEs."""
    structure = model_structure(g2was, tiny)
    model = noncentred(g2was, structure)
    guide = build_guide(guide_kind, model, tiny, model_structure(model, tiny))
    elbo = Trace_ELBO()
    guide(tiny, subsample_size=4)
    with torch.no_grad():
        full = np.array([elbo.loss(model, guide, tiny) for _ in range(400)])
        batch = np.array([elbo.loss(model, guide, tiny, subsample_size=4) for _ in range(400)])
    standard_error = math.sqrt(full.var() / len(full) + batch.var() / len(batch))
    assert abs(full.mean() - batch.mean()) < 4 * standard_error
    # The check has power: dropping the N/B scaling moves the mean by far more than that.
    assert abs(full.mean() - batch.mean() * 4 / tiny.n_varieties) > 4 * standard_error


def test_export_schema_and_netcdf_round_trip(tiny, tmp_path):
    result = fit_svi(g2was, tiny, SVIConfig(batch_size=4, max_steps=20, **QUICK))
    idata = result.inference_data
    for group in (
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
        "training_history",
    ):
        assert group in idata.groups()
    posterior = idata.posterior
    assert posterior["variety_scenario_effect"].dims == (
        "chain",
        "draw",
        "variety",
        "scenario",
        "curve_parameter",
    )
    assert posterior["plant_effect"].dims == (
        "chain",
        "draw",
        "variety",
        "scenario",
        "plant",
        "curve_parameter",
    )
    assert posterior["marker_effect"].dims == ("chain", "draw", "marker", "curve_parameter")
    assert posterior["curve"].dims == ("chain", "draw", "variety", "scenario", "plant", "time")
    assert list(posterior["variety"].values) == tiny.variety_ids
    assert list(posterior["curve_parameter"].values) == ["log_asymptote", "log_rate", "inflection"]
    assert idata.log_likelihood["obs"].shape == (1, 8, int(tiny.mask.sum()))
    assert posterior.attrs["engine"] == "svi"
    assert len(result.history) == 20 and "scenario_mean[well_watered, inflection]" in (
        result.population_summary.index
    )
    az.loo(idata)
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    for group in idata.groups():
        xr.testing.assert_identical(idata[group], back[group])


JOINT_CELLS = {
    "correlated_events": True,
    "correlated_plates": ("plant",),
    "exact_levels": ("variety_scenario_parameter",),
}
"""The README's guide options (centred g2was)."""


@pytest.mark.parametrize("guide_options", [{}, JOINT_CELLS], ids=["default", "joint_cells"])
def test_resume_equals_uninterrupted(tiny, tmp_path, killed_after, guide_options):
    options = {**guide_options, **QUICK}
    kwargs = {"parametrization": "centred"} if guide_options else {}
    config = SVIConfig(batch_size=4, max_steps=40, checkpoint_every=10, **options)
    pyro.set_rng_seed(0)
    whole = fit_svi(g2was, tiny, config, model_kwargs=kwargs)

    checkpoint = tmp_path / "run.pt"
    interrupted = SVIConfig(
        batch_size=4, max_steps=40, checkpoint_every=10, checkpoint_path=str(checkpoint), **options
    )
    with killed_after(25):
        fit_svi(g2was, tiny, interrupted, model_kwargs=kwargs)
    resumed = fit_svi(
        g2was,
        tiny,
        SVIConfig(
            batch_size=4,
            max_steps=40,
            checkpoint_every=10,
            checkpoint_path=str(checkpoint),
            resume=True,
            **options,
        ),
        model_kwargs=kwargs,
    )
    np.testing.assert_array_equal(resumed.history["loss"], whole.history["loss"])
    level = "variety_scenario_parameter" if guide_options else "variety_scenario_effect"
    for name in ("scenario_mean", "noise_sd", level):
        np.testing.assert_array_equal(
            resumed.inference_data.posterior[name].values,
            whole.inference_data.posterior[name].values,
        )


def test_learning_rate_decays_over_lr_decay_steps_then_holds(tiny, tmp_path):
    """After ``lr_decay_steps`` every parameter's rate is ``lr_final`` times its factor, and
    stays there (read from the last checkpoint's optimiser state, 20 steps later)."""
    checkpoint = tmp_path / "run.pt"
    config = SVIConfig(
        batch_size=4,
        max_steps=30,
        lr=0.02,
        lr_final=0.002,
        lr_decay_steps=10,
        checkpoint_every=30,
        checkpoint_path=str(checkpoint),
        **QUICK,
    )
    fit_svi(g2was, tiny, config)
    state = torch.load(checkpoint, weights_only=False)["optim"]
    for name, optimizer_state in state.items():
        factor = 1.0
        if name.startswith(ENCODER + "."):
            factor = config.encoder_lr_factor
            if MARKER_LAYER in name:
                factor *= config.marker_lr_factor
        for group in optimizer_state["param_groups"]:
            assert group["lr"] == pytest.approx(config.lr_final * factor, rel=1e-5), name
            assert group["lrd"] == 1.0


def test_plateau_rule_is_checked_only_once_the_learning_rate_is_held(tiny):
    """A rule that always says "converged" ends the run exactly at ``lr_decay_steps``."""

    class Always(PlateauRule):
        def converged(self, losses) -> bool:
            return True

    config = SVIConfig(
        batch_size=4,
        max_steps=40,
        lr_decay_steps=12,
        progress=False,
        num_draws=8,
        stopping=Always(),
    )
    assert len(fit_svi(g2was, tiny, config).history) == 12


def test_noncentred_sites_are_fitted_decentred_and_exported_under_their_own_name(tiny):
    kwargs = {"marker_form": "kinship", "parametrization": "centred"}
    config = SVIConfig(
        batch_size=4, max_steps=5, noncentred_sites=("genetic_value_component",), **QUICK
    )
    fit = fit_svi(g2was, tiny, config, model_kwargs=kwargs)
    assert "population.locs.genetic_value_component_decentered" in pyro.get_param_store()
    posterior = fit.inference_data.posterior
    assert "genetic_value_component" in posterior
    assert not any(name.endswith("_decentered") for name in posterior)
    with pytest.raises(ValueError, match="genetic_value_componnet"):
        bad = dataclasses.replace(config, noncentred_sites=("genetic_value_componnet",))
        fit_svi(g2was, tiny, bad, model_kwargs=kwargs)


def _exploding(data, subsample_size=None):
    level = pyro.sample("level", dist.Normal(0.0, 1.0))
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        with scenario_plate(data), plant_plate(data), time_plate(data):
            prediction = torch.sqrt(level - 100.0) * batch.times  # NaN: sqrt of a negative
            observe(batch, dist.Normal(prediction, 1.0))


def test_nonfinite_loss_stops_with_step_and_site(orange_data, tmp_path):
    config = SVIConfig(
        guide="normal",
        batch_size=None,
        max_steps=5,
        checkpoint_path=str(tmp_path / "run.pt"),
        **QUICK,
    )
    with pytest.raises(NonFiniteError, match=r"SVI step 1: .*model:obs") as info:
        fit_svi(_exploding, orange_data, config)
    assert "last finite state is saved" in str(info.value)
    assert (tmp_path / "run-last-finite.pt").exists()


@pytest.mark.parametrize("guide_kind", ["lowrank", "normal"])
def test_other_guides_fit_and_export(tiny, guide_kind):
    result = fit_svi(g2was, tiny, SVIConfig(guide=guide_kind, batch_size=4, max_steps=10, **QUICK))
    assert result.inference_data.posterior["scenario_mean"].shape == (1, 8, 3, 3)
    assert np.isfinite(result.history["loss"]).all()


def test_plateau_rule_stops_on_flat_noise_and_not_on_a_descent():
    rule = PlateauRule(window=50, patience=2, min_steps=100)
    rng = np.random.default_rng(0)
    flat = list(rng.normal(0.0, 1.0, 150))
    assert rule.converged(flat)
    descending = list(np.linspace(100.0, 0.0, 150) + rng.normal(0.0, 1.0, 150))
    assert not rule.converged(descending)
