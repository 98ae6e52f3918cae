"""Marker priors: each log-density against a hand computation (scipy), the spike-and-slab
inclusion probability against the exact two-component posterior, sampling moments."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from pyro_nlme.model.marker_priors import (
    SpikeSlabNormal,
    horseshoe_effects,
    horseshoe_global_scale,
    ridge_effects,
    sample_marker_effects,
    spike_slab_effects,
)

N_MARKERS, N_OBSERVATIONS = 40, 25
GENETIC_SD = torch.tensor([0.3, 0.2, 1.5], dtype=torch.float64)


def traced(fn, *args, **kwargs):
    trace = poutine.trace(fn).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    values = {n: s["value"].numpy() for n, s in trace.nodes.items() if s["type"] == "sample"}
    return trace, values


def test_ridge_log_density_by_hand():
    trace, v = traced(ridge_effects, N_MARKERS, GENETIC_SD)
    expected = stats.norm(0, GENETIC_SD.numpy() / math.sqrt(N_MARKERS)).logpdf(v["marker_effect"])
    assert v["marker_effect"].shape == (N_MARKERS, 3)
    np.testing.assert_allclose(float(trace.log_prob_sum()), expected.sum(), rtol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_horseshoe_log_density_by_hand(shared):
    scale = GENETIC_SD
    trace, v = traced(horseshoe_effects, N_MARKERS, N_OBSERVATIONS, scale, 4.0, 2.0, 5.0, shared)
    tau0 = 4.0 / (N_MARKERS - 4.0) * scale.numpy() / math.sqrt(N_OBSERVATIONS)
    tau = v["marker_effect_global_scale"]
    c2 = v["marker_effect_slab_variance"]
    local = v["marker_effect_local_scale"]
    assert local.shape == ((N_MARKERS,) if shared else (N_MARKERS, 3))
    local = local[:, None] if shared else local
    lam2 = c2 * local**2 / (c2 + tau**2 * local**2)
    expected = (
        stats.halfcauchy(scale=tau0).logpdf(tau).sum()
        + stats.invgamma(5.0 / 2, scale=5.0 * (2.0 * scale.numpy()) ** 2 / 2).logpdf(c2).sum()
        + stats.halfcauchy().logpdf(v["marker_effect_local_scale"]).sum()
        + stats.norm(0, tau * np.sqrt(lam2)).logpdf(v["marker_effect"]).sum()
    )
    np.testing.assert_allclose(float(trace.log_prob_sum()), expected, rtol=1e-9)
    torch.testing.assert_close(
        horseshoe_global_scale(N_MARKERS, N_OBSERVATIONS, scale, 4.0),
        torch.as_tensor(tau0),
    )


@pytest.mark.parametrize("shared", [False, True])
def test_spike_slab_log_density_by_hand(shared):
    p0, slab_scale, spike_scale = 3.0, 1.5, 0.5
    trace, v = traced(
        spike_slab_effects, N_MARKERS, GENETIC_SD, p0, slab_scale, spike_scale, shared
    )
    g = GENETIC_SD.numpy()
    spike_sd, slab_sd = g * spike_scale / math.sqrt(N_MARKERS), g * slab_scale / math.sqrt(p0)
    pi = v["marker_effect_inclusion"]
    u = v["marker_effect_standardised"]
    unit = np.sqrt(spike_sd * slab_sd)
    slab = stats.norm(0, slab_sd / unit).logpdf(u)
    spike = stats.norm(0, spike_sd / unit).logpdf(u)
    if shared:
        assert pi.shape == ()
        slab, spike = slab.sum(-1), spike.sum(-1)
    else:
        assert pi.shape == (3,)
    log_mixture = logsumexp([np.log(pi) + slab, np.log1p(-pi) + spike], axis=0)
    expected = stats.beta(1, (N_MARKERS - p0) / p0).logpdf(pi).sum() + log_mixture.sum()
    np.testing.assert_allclose(float(trace.log_prob_sum()), expected, rtol=1e-9)
    np.testing.assert_allclose(v["marker_effect"], u * unit, rtol=1e-12)
    # the per-draw inclusion probability: slab term over both
    conditional = np.exp(np.log(pi) + slab - log_mixture)
    if shared:
        conditional = np.repeat(conditional[:, None], 3, axis=1)
    np.testing.assert_allclose(v["marker_effect_inclusion_probability"], conditional, rtol=1e-8)


def test_inclusion_probability_is_the_exact_two_component_posterior():
    """x ~ Normal(beta, s), beta ~ pi N(0, slab) + (1 - pi) N(0, spike): the exact PIP is
    pi N(x; 0, slab^2 + s^2) / (pi N(x; 0, slab^2 + s^2) + (1 - pi) N(x; 0, spike^2 + s^2)).
    Averaging the per-draw P(slab | beta) over exact posterior draws of beta (the exported PIP)
    must give it, within 4 Monte-Carlo SEs."""
    torch.manual_seed(0)
    pi, slab, spike, s = 0.1, 1.0, 0.05, 0.3
    mixture = SpikeSlabNormal(
        torch.tensor(spike, dtype=torch.float64),
        torch.tensor(slab, dtype=torch.float64),
        torch.tensor(pi, dtype=torch.float64),
    )
    for x in (0.05, 0.4, 0.8, 1.5):
        evidence = np.array(
            [
                pi * stats.norm(0, math.hypot(slab, s)).pdf(x),
                (1 - pi) * stats.norm(0, math.hypot(spike, s)).pdf(x),
            ]
        )
        exact = evidence[0] / evidence.sum()
        # exact posterior draws: component, then beta | component, x (conjugate normal)
        n = 20_000
        in_slab = torch.rand(n, dtype=torch.float64) < exact
        prior_var = torch.where(in_slab, torch.tensor(slab**2), torch.tensor(spike**2)).double()
        post_var = 1 / (1 / prior_var + 1 / s**2)
        beta = post_var * x / s**2 + post_var.sqrt() * torch.randn(n, dtype=torch.float64)
        conditional = mixture.inclusion_probability(beta)
        estimate = conditional.mean().item()
        error = conditional.std().item() / math.sqrt(n)
        assert abs(estimate - exact) < 4 * error + 1e-12, (x, estimate, exact, error)


@pytest.mark.parametrize("shared", [False, True])
def test_spike_slab_sampling_moments(shared):
    """Mixture variance pi slab^2 + (1 - pi) spike^2; with a shared indicator the components
    of one draw are both from the slab or both from the spike."""
    torch.manual_seed(1)
    spike, slab, pi = torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]), torch.tensor(0.3)
    mixture = SpikeSlabNormal(spike, slab, pi if shared else pi.expand(2), shared=shared)
    draws = mixture.sample((100_000,)).double()
    assert draws.shape == (100_000, 2)
    expected = pi * slab**2 + (1 - pi) * spike**2
    squares = draws**2
    error = squares.std(0) / math.sqrt(len(draws))
    assert ((squares.mean(0) - expected).abs() < 4 * error).all()
    # E[x1^2 x2^2]: pi slab1^2 slab2^2 + (1 - pi) spike1^2 spike2^2 with one indicator,
    # the product of the marginal second moments with two
    products = squares.prod(-1)
    if shared:
        cross = pi * (slab**2).prod() + (1 - pi) * (spike**2).prod()
    else:
        cross = expected.prod()
    error = products.std() / math.sqrt(len(draws))
    assert abs(products.mean() - cross) < 4 * error


def test_unknown_prior_and_shared_ridge_are_errors():
    with pytest.raises(ValueError, match="unknown marker prior"):
        sample_marker_effects("lasso", 10, 5, GENETIC_SD, GENETIC_SD)
    with pytest.raises(ValueError, match="no sparsity"):
        sample_marker_effects("ridge", 10, 5, GENETIC_SD, GENETIC_SD, shared=True)
    with pytest.raises(ValueError, match="expected_nonzero"):
        pyro.poutine.trace(spike_slab_effects).get_trace(10, GENETIC_SD, 10.0)


@pytest.mark.parametrize("shared", [False, True])
def test_spike_slab_moments_and_quantiles_with_component_locations(shared):
    """Mean, variance and marginal CDF against the two-component mixture by hand; the
    quantile function inverts the CDF (the prior's median is 0)."""
    spike, slab = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([1.0, 2.0])
    slab = slab.double()
    spike_loc, slab_loc = torch.tensor([0.05, -0.1]).double(), torch.tensor([1.5, -2.0]).double()
    pi = torch.tensor(0.3, dtype=torch.float64)
    mixture = SpikeSlabNormal(
        spike, slab, pi if shared else pi.expand(2), shared, spike_loc=spike_loc, slab_loc=slab_loc
    )
    p = float(pi)
    mean = p * slab_loc + (1 - p) * spike_loc
    second = p * (slab**2 + slab_loc**2) + (1 - p) * (spike**2 + spike_loc**2)
    np.testing.assert_allclose(mixture.mean.numpy(), mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(mixture.variance.numpy(), (second - mean**2).numpy(), rtol=1e-12)
    x = torch.tensor([-1.0, 0.7], dtype=torch.float64)
    expected = p * stats.norm(slab_loc, slab).cdf(x) + (1 - p) * stats.norm(spike_loc, spike).cdf(x)
    np.testing.assert_allclose(mixture.cdf(x).numpy(), expected, rtol=1e-12)
    levels = torch.tensor([0.05, 0.5], dtype=torch.float64)
    np.testing.assert_allclose(mixture.cdf(mixture.icdf(levels)).numpy(), levels, atol=1e-12)
    prior = SpikeSlabNormal(spike, slab, pi if shared else pi.expand(2), shared)
    half = torch.full(prior.batch_shape, 0.5, dtype=torch.float64)
    assert prior.icdf(half).abs().max() < 1e-12
