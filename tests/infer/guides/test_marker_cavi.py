"""Coordinate-ascent spike-and-slab factor: the exact posterior of one marker, the fixed point of
one-marker-at-a-time updates, and the guide inside an SVI fit of g2was."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.infer.guides.factory import build_guide
from pyro_nlme.infer.guides.marker_cavi import (
    SpikeSlabFactor,
    WorkingRegression,
    global_scale_site,
    local_scale_site,
    log_scale_moments,
)
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.infer.util import model_structure
from pyro_nlme_models.g2was import g2was

PRIOR_VARIANCE = torch.tensor([[0.01, 0.02], [4.0, 9.0]], dtype=torch.float64)  # spike, slab
SHORT_CAVI_FIT = SVIConfig(
    guide="normal",
    batch_size=8,
    max_steps=20,
    cavi_every=5,
    marker_updates="cavi",
    stopping=None,
    num_draws=4,
    progress=False,
)
"""20 steps of a mean-field fit with coordinate-ascent marker updates every 5."""


def genotypes(
    n_varieties: int, n_markers: int, seed: int = 0, structured: bool = False
) -> GenotypeMatrix:
    """Random dosages; ``structured``: two subpopulations with allele frequencies 0.15 and
    0.85 at every marker, so that all markers correlate (about 0.6) through ancestry."""
    rng = np.random.default_rng(seed)
    frequency = np.full((n_varieties, 1), 0.5)
    if structured:
        frequency = np.where(np.arange(n_varieties)[:, None] < n_varieties // 2, 0.15, 0.85)
    dosages = rng.binomial(2, np.broadcast_to(frequency, (n_varieties, n_markers)))
    return GenotypeMatrix.from_dosages(dosages.astype(np.int8), [f"m{j}" for j in range(n_markers)])


def initial_factor(n_markers: int, inclusion: np.ndarray, strength: float, shared=False):
    """Factor at the prior, ``pi ~ Beta(strength * inclusion, strength * (1 - inclusion))``."""
    inclusion = torch.as_tensor(inclusion, dtype=torch.float64)
    k = PRIOR_VARIANCE.shape[1]
    alpha = inclusion.expand(n_markers) if shared else inclusion.expand(n_markers, k)
    return SpikeSlabFactor(
        alpha.clone(),
        torch.zeros(2, n_markers, k, dtype=torch.float64),
        PRIOR_VARIANCE[:, None, :].expand(2, n_markers, k).clone(),
        shared,
        (strength * inclusion, strength * (1 - inclusion)),
    )


def test_one_marker_factor_is_the_exact_posterior():
    """With one marker and a known inclusion probability (a Beta prior concentrated on it),
    one update gives the exact posterior: slab probability and posterior mean against
    quadrature over the effect."""
    markers = genotypes(30, 1)
    z = markers.standardized().double()[:, 0].numpy()
    rng = np.random.default_rng(1)
    unit, weight = np.array([0.5, 2.0]), rng.uniform(2.0, 8.0, size=(30, 2))
    response = np.outer(z, unit * np.array([1.0, 0.0])) + rng.normal(size=(30, 2)) / weight**0.5
    inclusion = np.array([0.2, 0.6])
    regression = WorkingRegression(
        *(torch.tensor(x) for x in (response, weight, unit)), PRIOR_VARIANCE[:, None, :]
    )
    factor = initial_factor(1, inclusion, strength=1e9)
    factor.ascend(markers, regression, sweeps=1)
    grid = np.linspace(-15, 15, 300_001)
    for k in range(2):
        log_lik = stats.norm(np.outer(grid, unit[k] * z), weight[:, k] ** -0.5).logpdf(
            response[:, k]
        )
        likelihood = np.exp(log_lik.sum(1) - log_lik.sum(1).max())
        slab = inclusion[k] * stats.norm(0, math.sqrt(PRIOR_VARIANCE[1, k])).pdf(grid)
        spike = (1 - inclusion[k]) * stats.norm(0, math.sqrt(PRIOR_VARIANCE[0, k])).pdf(grid)
        evidence_slab, evidence_spike = (np.trapezoid(p * likelihood, grid) for p in (slab, spike))
        mean = np.trapezoid(grid * (slab + spike) * likelihood, grid)
        exact_alpha = evidence_slab / (evidence_slab + evidence_spike)
        np.testing.assert_allclose(float(factor.alpha[0, k]), exact_alpha, rtol=1e-5)
        np.testing.assert_allclose(
            float(factor.mean()[0, k]), mean / (evidence_slab + evidence_spike), rtol=1e-5
        )
    assert float(factor.alpha[0, 0]) > 0.9 > 0.1 > float(factor.alpha[0, 1])


def regression_with_three_effects(markers: GenotypeMatrix, shared: bool):
    """A working regression with effects at markers 3, 50, 120 (``shared``: on both curve
    parameters; else on the first, and marker 50 on the second too); returns it and the
    effects ``[M, 2]``."""
    z = markers.standardized().double().numpy()
    rng = np.random.default_rng(2)
    unit = np.array([0.5, 2.0])
    effects = np.zeros((markers.n_markers, 2))
    effects[[3, 50, 120], 0] = [3.0, -3.0, 4.0]
    effects[[3, 50, 120], 1] = [1.5, 2.0, -1.5] if shared else [0.0, 2.0, 0.0]
    weight = rng.uniform(5.0, 20.0, size=(markers.n_varieties, 2))
    response = z @ (unit * effects) + rng.normal(size=weight.shape) / weight**0.5
    regression = WorkingRegression(
        *(torch.tensor(x) for x in (response, weight, unit)), PRIOR_VARIANCE[:, None, :]
    )
    return regression, effects


def assert_selects(factor: SpikeSlabFactor, effects: np.ndarray) -> None:
    alpha = factor.alpha.numpy()
    if factor.shared:
        alpha = alpha[:, None].repeat(2, 1)
    assert (alpha[effects != 0] > 0.99).all()
    assert (alpha[effects == 0] < 0.5).all()


@pytest.mark.parametrize("shared", [False, True])
def test_blocked_updates_reach_a_fixed_point_of_one_marker_updates(shared):
    """Updating markers 16 apart together converges to a point that one-marker-at-a-time
    coordinate ascent (``n_blocks = M``) does not move, and that includes the true effects
    only. (Both orders approach it slowly: changes of about 2e-4 a sweep after 300.)"""
    markers = genotypes(80, 200)
    regression, effects = regression_with_three_effects(markers, shared)
    factor = initial_factor(200, np.array(0.02 if shared else [0.02, 0.02]), 50.0, shared)
    factor.ascend(markers, regression, sweeps=300, n_blocks=16)
    blocked = factor.mean().clone()
    factor.ascend(markers, regression, sweeps=1, n_blocks=200)
    assert (factor.mean() - blocked).abs().max() < 1e-3
    assert_selects(factor, effects)


def test_blocked_updates_converge_under_population_structure():
    """Two subpopulations make every pair of markers correlate (mean |r| 0.66): the blocks'
    damped steps still converge (one-marker updates are slower here: 3e-3 a sweep after
    1,000) and select the true effects only."""
    markers = genotypes(80, 200, structured=True)
    regression, effects = regression_with_three_effects(markers, shared=False)
    factor = initial_factor(200, np.array([0.02, 0.02]), 50.0)
    factor.ascend(markers, regression, sweeps=1000, n_blocks=16)
    before = factor.mean().clone()
    factor.ascend(markers, regression, sweeps=1, n_blocks=16)
    assert (factor.mean() - before).abs().max() < 1e-3
    assert_selects(factor, effects)


GLOBAL_SCALES = {"ridge": "genetic_sd", "horseshoe": "marker_effect_global_scale"}


@pytest.mark.parametrize("prior", ["ridge", "horseshoe"])
def test_global_scale_site_of_g2was(simulated_data, prior):
    kwargs = {"marker_prior": prior, "parametrization": "centred", "subsample_size": None}
    trace = poutine.trace(g2was).get_trace(simulated_data, **kwargs)
    found = global_scale_site(g2was, simulated_data, trace, "marker_effect", kwargs)
    assert found == GLOBAL_SCALES[prior]


def test_a_scale_with_another_child_is_not_a_global_scale(simulated_data):
    """A scale that also sets another site's prior cannot be updated from the effects alone."""

    def model(data, subsample_size=None):
        scale = pyro.sample("scale", dist.HalfNormal(torch.ones(2)).to_event(1))
        pyro.sample("other", dist.Normal(0.0, scale).to_event(1))
        with pyro.plate("marker", 50, dim=-1):
            pyro.sample("effect", dist.Normal(torch.zeros(2), scale).to_event(1))

    trace = poutine.trace(model).get_trace(simulated_data)
    assert global_scale_site(model, simulated_data, trace, "effect", {}) is None


@pytest.mark.parametrize(
    "prior, expected",
    [("ridge", None), ("horseshoe", "marker_effect_local_scale")]
    + [("horseshoe_shared", "marker_effect_local_scale")],
)
def test_local_scale_site_of_g2was(simulated_data, prior, expected):
    kwargs = {"marker_prior": prior, "parametrization": "centred", "subsample_size": None}
    trace = poutine.trace(g2was).get_trace(simulated_data, **kwargs)
    assert local_scale_site(g2was, simulated_data, trace, "marker_effect", kwargs) == expected


def test_a_marker_scale_with_another_child_is_not_a_local_scale(simulated_data):
    def model(data, subsample_size=None):
        with pyro.plate("marker", 50, dim=-1):
            scale = pyro.sample("scale", dist.HalfCauchy(torch.ones(2)).to_event(1))
            pyro.sample("effect", dist.Normal(torch.zeros(2), scale).to_event(1))
            pyro.sample("other", dist.Normal(0.0, scale).to_event(1))

    trace = poutine.trace(model).get_trace(simulated_data)
    assert local_scale_site(model, simulated_data, trace, "effect", {}) is None


def horseshoe_local_log_density(x, precision, score, tau, slab_variance, shared=False):
    """``log q(x = log lambda)`` of regularised-horseshoe local scales (``lambda ~
    HalfCauchy(1)``) given each effect's data as an estimate ``score / precision`` of variance
    ``1 / precision``, and the global and slab scales, in closed form, up to a constant: the
    prior variance is ``tau ** 2 lambda_tilde ** 2``, ``lambda_tilde ** -2 = lambda ** -2 + tau
    ** 2 / c ** 2``. ``shared``: one ``lambda`` for the effects' last dim."""
    log_prior = -torch.log1p(torch.exp(2 * x)) + x
    x = x[..., None] if shared else x
    variance = tau**2 / (torch.exp(-2 * x) + tau**2 / slab_variance)
    estimate = score / precision
    evidence = dist.Normal(0, (1 / precision + variance).sqrt()).log_prob(estimate)
    return log_prior + (evidence.sum(-1) if shared else evidence)


def test_log_scale_moments_are_those_of_the_density():
    """Against a dense grid (step 1e-3) of the horseshoe's local-scale density, from markers
    the data barely see (the prior) or see as null to strong effects capped by the slab (a
    tail of the prior's, ``exp(-x)``); and Gaussians, whose moments are their locations and
    scales."""
    precision = torch.tensor([1e-12, 1e-4, 1e4, 1e4, 1e4, 1e-2, 1e2], dtype=torch.float64)
    z_score = torch.tensor([0.0, 1.0, 0.0, 2.0, 8.0, 30.0, 300.0], dtype=torch.float64)
    precision = precision.repeat(2)[:, None]  # [14, 1]
    score = z_score.repeat(2)[:, None] * precision.sqrt()
    slab_variance = torch.tensor([1e8] * 7 + [1e2] * 7, dtype=torch.float64)[:, None]
    density = lambda x: horseshoe_local_log_density(x, precision, score, 1.0, slab_variance)  # noqa: E731
    mean, sd = log_scale_moments(density, precision.shape)
    grid = torch.arange(-40, 60, 1e-3, dtype=torch.float64)
    weights = torch.softmax(density(grid.expand(14, -1)), -1)
    exact_mean = (weights * grid).sum(-1, keepdim=True)
    exact_sd = (weights * (grid - exact_mean) ** 2).sum(-1, keepdim=True).sqrt()
    # quadrature errors negligible against the factor's spread
    assert ((mean - exact_mean).abs() / exact_sd).max() < 1e-3
    torch.testing.assert_close(sd, exact_sd, rtol=1e-3, atol=0)
    loc = torch.tensor([-3.0, 0.5, 20.0, -30.0], dtype=torch.float64)
    scale = torch.tensor([0.01, 2.0, 0.5, 1.0], dtype=torch.float64)
    mean, sd = log_scale_moments(lambda x: dist.Normal(loc, scale).log_prob(x), loc.shape)
    torch.testing.assert_close(mean, loc)
    # the grids stop 15 nats below the mode, 5.5 SDs: 2e-7 of the variance is cut off
    torch.testing.assert_close(sd, scale, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="reaches an end"):
        log_scale_moments(lambda x: -((x - 70) ** 2), loc.shape)


@pytest.mark.parametrize("prior", ["horseshoe", "horseshoe_shared"])
def test_local_scale_factor_targets_the_horseshoe_conditional(simulated_data, prior):
    """The local scales' log-density read off g2was (run up to its effects) equals the
    regularised horseshoe's in closed form given each effect's marginal likelihood, at the
    guide's medians of the global scale and the slab."""
    kwargs = {"marker_prior": prior, "parametrization": "centred"}
    structure = model_structure(g2was, simulated_data, **kwargs)
    guide = build_guide(
        "normal",
        g2was,
        simulated_data,
        structure,
        cavi_response_site="variety_scenario_parameter",
        model_kwargs=kwargs,
    )
    guide(simulated_data, **kwargs)  # sets up its parts
    guide = guide.markers
    assert guide.local_site == "marker_effect_local_scale"
    shared = prior == "horseshoe_shared"
    tau = guide.scale_posterior().loc.exp().double()
    generator = torch.Generator().manual_seed(0)
    shape = (simulated_data.n_markers,) if shared else (simulated_data.n_markers, 3)
    x = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    # estimates' SDs and sizes from far below to far above the global scale
    precision = torch.exp(6 * torch.randn(x.shape[0], 3, generator=generator)) / tau**2
    z_score = torch.exp(torch.randn(precision.shape, generator=generator, dtype=torch.float64))
    score = z_score * precision.sqrt()
    point = guide.medians(simulated_data, subsample_size=None, **kwargs)
    slab_variance = point["marker_effect_slab_variance"].double()
    expected = horseshoe_local_log_density(x, precision, score, tau, slab_variance, shared)
    log_density = guide.local_log_density(simulated_data, precision, score, **kwargs)
    expected = expected - horseshoe_local_log_density(
        torch.zeros_like(x), precision, score, tau, slab_variance, shared
    )
    found = (log_density(x.float()) - log_density(torch.zeros_like(x).float())).double()
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("prior", ["ridge", "horseshoe"])
def test_cavi_guide_fits_gaussian_marker_priors(simulated_data, prior):
    """Ridge and horseshoe effects by coordinate ascent: the effects stay centred (no
    ``*_decentered`` site), the factor's state (its working regression) is in the parameter
    store, the global scale's factor is set by the updates (not by Adam: no AutoNormal
    parameter), the fit exports, with the factor's exact mean in the ``guide_mean`` group."""
    kwargs = {"marker_prior": prior, "parametrization": "centred"}
    fit = fit_svi(g2was, simulated_data, SHORT_CAVI_FIT, model_kwargs=kwargs)
    scale = GLOBAL_SCALES[prior]
    assert not any(name.endswith(f"locs.{scale}") for name in pyro.get_param_store())
    sd = pyro.param("marker_effect.cavi_scale_sd")
    assert sd.shape == (3,) and (sd > 0).all() and (sd < 1).all()
    draws = fit.inference_data.posterior[scale].values
    assert draws.shape == (1, 4, 3) and (draws.std(1) > 0).all()
    variance = pyro.param("marker_effect.cavi_prior_variance")
    assert variance.shape == (simulated_data.n_markers, 3)
    assert pyro.param("marker_effect.cavi_weight").shape == (simulated_data.n_varieties, 3)
    assert (pyro.param("marker_effect.cavi_weight") > 0).all()
    assert "marker_effect_decentered" not in fit.inference_data.posterior
    effects = fit.inference_data.posterior["marker_effect"].values
    assert effects.shape == (1, 4, simulated_data.n_markers, 3) and np.isfinite(effects).all()
    mean = fit.inference_data.guide_mean["marker_effect"]
    assert mean.dims == ("marker", "curve_parameter") and np.isfinite(mean.values).all()
    assert list(mean["marker"].values) == list(fit.inference_data.posterior["marker"].values)
    assert fit.history["loss"].notna().all()
    if prior == "horseshoe":  # the local scales' factors are set by the updates too
        assert not any(
            name.endswith("marker_effect_local_scale") for name in pyro.get_param_store()
        )
        sd = pyro.param("marker_effect.cavi_local_sd")
        assert sd.shape == (simulated_data.n_markers, 3) and (sd > 0).all()
        draws = fit.inference_data.posterior["marker_effect_local_scale"].values
        assert (draws > 0).all() and (draws.std(1) > 0).all()


def test_cavi_guide_fits_g2was_and_exports_inclusion_probabilities(simulated_data):
    kwargs = {"marker_prior": "spike_slab", "parametrization": "centred"}
    fit = fit_svi(g2was, simulated_data, SHORT_CAVI_FIT, model_kwargs=kwargs)
    posterior = fit.inference_data.posterior
    pip = posterior["marker_effect_inclusion_probability"].values
    assert pip.shape == (1, 4, simulated_data.n_markers, 3)
    assert ((pip >= 0) & (pip <= 1)).all()
    inclusion = posterior["marker_effect_inclusion"].values
    assert ((inclusion > 0) & (inclusion < 1)).all()
    state = pyro.param("marker_effect_standardised.cavi_alpha")
    assert state.shape == (simulated_data.n_markers, 3)
    assert fit.history["loss"].notna().all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guide": "amortized"}, "needs guide='normal'"),
        ({"marker_updates": "newton"}, "marker_updates must be one of"),
    ],
)
def test_cavi_configuration_errors(simulated_data, change, message):
    config = SVIConfig(**{"guide": "normal", "marker_updates": "cavi", **change}, max_steps=1)
    kwargs = {"marker_prior": "spike_slab", "parametrization": "centred"}
    with pytest.raises(ValueError, match=message):
        fit_svi(g2was, simulated_data, config, model_kwargs=kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"marker_prior": "neural", "parametrization": "centred"}, "exactly one marker-effect"),
        ({"marker_prior": "spike_slab"}, "no site 'variety_scenario_parameter'"),
    ],
)
def test_cavi_needs_a_marker_effect_site_and_a_centred_response(simulated_data, kwargs, message):
    config = SVIConfig(guide="normal", marker_updates="cavi", max_steps=1, progress=False)
    with pytest.raises(ValueError, match=message):
        fit_svi(g2was, simulated_data, config, model_kwargs=kwargs)


def test_cavi_resume_equals_uninterrupted(simulated_data, tmp_path, killed_after):
    """The coordinate-ascent state is in the checkpoint: a run killed after step 17 and
    resumed from its step-10 checkpoint ends where an uninterrupted run does."""
    kwargs = {"marker_prior": "spike_slab", "parametrization": "centred"}
    checkpoint = tmp_path / "run.pt"

    def config(**extra):
        return dataclasses.replace(
            SHORT_CAVI_FIT, max_steps=24, num_draws=2, checkpoint_every=10, **extra
        )

    whole = fit_svi(g2was, simulated_data, config(), model_kwargs=kwargs)

    with killed_after(17):
        fit_svi(g2was, simulated_data, config(checkpoint_path=str(checkpoint)), model_kwargs=kwargs)
    resumed = fit_svi(
        g2was,
        simulated_data,
        config(checkpoint_path=str(checkpoint), resume=True),
        model_kwargs=kwargs,
    )
    np.testing.assert_array_equal(resumed.history["loss"], whole.history["loss"])
    for name in ("marker_effect", "marker_effect_inclusion", "genetic_sd"):
        np.testing.assert_array_equal(
            resumed.inference_data.posterior[name].values,
            whole.inference_data.posterior[name].values,
        )
