"""The joint posterior of marker effects in a Gaussian regression, against dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_marker_cavi import genotypes  # same folder: pytest puts it on the path

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.infer.guides.gaussian_regression import (
    GaussianRegressionPosterior,
    single_effect_log_evidence,
)


def regression(n_varieties: int, n_markers: int, seed: int, weight_scale: float = 1.0):
    """Structured genotypes (every marker correlates through ancestry), effects at every marker,
    per-marker prior variances, per-variety weights: ``(markers, response [V, 2], weight [V,
    2], unit [2], prior_variance [M, 2])``, float64."""
    markers = genotypes(n_varieties, n_markers, seed, structured=True)
    z = markers.standardized().double().numpy()
    rng = np.random.default_rng(seed)
    unit = np.array([0.5, 2.0])
    weight = weight_scale * rng.uniform(5.0, 20.0, size=(n_varieties, 2))
    response = z @ (unit * rng.normal(size=(n_markers, 2))) + rng.normal(size=weight.shape) / (
        weight**0.5
    )
    prior_variance = rng.uniform(0.5, 4.0, size=(n_markers, 2))
    return markers, *(torch.tensor(x) for x in (response, weight, unit, prior_variance))


def standardized(markers: GenotypeMatrix) -> torch.Tensor:
    """float64 standardised dosages from the matrix's float32 moments, as the posterior
    computes them (no missing genotypes here)."""
    return (markers.dosages.double() - markers.mean.double()) / markers.scale.double()


def dense_posteriors(markers: GenotypeMatrix, response, weight, unit, prior_variance):
    """Per curve parameter, the exact posterior from the ``M x M`` precision."""
    z = standardized(markers)
    posteriors = []
    for k in range(unit.numel()):
        precision = unit[k] ** 2 * z.T @ (weight[:, k, None] * z) + torch.diag(
            1 / prior_variance[:, k]
        )
        mean = torch.linalg.solve(precision, unit[k] * z.T @ (weight[:, k] * response[:, k]))
        posteriors.append(torch.distributions.MultivariateNormal(mean, precision_matrix=precision))
    return posteriors


def test_mean_and_density_equal_the_dense_posterior():
    """More markers than varieties, under population structure: the Woodbury mean and the
    Sylvester density equal the ``M x M`` algebra's."""
    markers, *args = regression(30, 80, seed=3)
    posterior = GaussianRegressionPosterior(markers, *args)
    dense = dense_posteriors(markers, *args)
    mean = torch.stack([q.mean for q in dense], 1)
    torch.testing.assert_close(posterior.mean, mean)
    values = torch.stack([q.sample((3,)) for q in dense], -1)  # [3, M, K]
    expected = sum(q.log_prob(values[..., k]) for k, q in enumerate(dense))
    torch.testing.assert_close(posterior.log_prob(values), expected)


def test_marginal_variances_are_the_dense_posterior_diagonal():
    """Including effects the data determine (weights 1,000 times larger), where the Woodbury
    correction nearly cancels the prior variance."""
    for weight_scale in (1.0, 1000.0):
        markers, *args = regression(30, 80, seed=5, weight_scale=weight_scale)
        posterior = GaussianRegressionPosterior(markers, *args)
        dense = dense_posteriors(markers, *args)
        diagonal = torch.stack([q.covariance_matrix.diagonal() for q in dense], 1)
        torch.testing.assert_close(posterior.variance, diagonal)


@pytest.mark.parametrize("weight_scale", [1.0, 1000.0])
def test_marker_evidence_is_the_marginal_likelihood_of_each_prior_variance(weight_scale):
    """Changing one marker's prior variance (to 0, 1/100 of it, 100 times it) changes the
    dense marginal likelihood of the response by what the evidence says, including for
    effects the data determine, where ``1 - d S`` is small."""
    markers, response, weight, unit, prior_variance = regression(
        30, 80, seed=7, weight_scale=weight_scale
    )
    posterior = GaussianRegressionPosterior(markers, response, weight, unit, prior_variance)
    precision, score = posterior.marker_evidence(chunk_markers=7)
    args = (markers, response, weight, unit)
    ratio = torch.ones(1, 2, dtype=torch.float64)
    base = dense_log_marginal(*args, prior_variance, ratio)[0]
    for marker in (0, 41, 79):
        at_base = single_effect_log_evidence(
            precision[marker], score[marker], prior_variance[marker]
        )
        for factor in (0.0, 0.01, 100.0):
            changed = prior_variance.clone()
            changed[marker] *= factor
            expected = dense_log_marginal(*args, changed, ratio)[0] - base
            found = (
                single_effect_log_evidence(precision[marker], score[marker], changed[marker])
                - at_base
            )
            torch.testing.assert_close(found, expected, rtol=1e-7, atol=1e-8)


def test_marker_evidence_of_a_lone_effect_is_least_squares():
    """With every other prior variance 0, ``s`` is the marker's information and ``q / s`` its
    weighted least-squares estimate. (With weights 1,000 times larger, ``d s`` reaches 3e6 and
    ``S`` loses 4 digits to cancellation in its quadratic form, which ``1 - d S`` then
    magnifies: ``s`` is off by 4e-4 relative there.)"""
    markers, response, weight, unit, prior_variance = regression(30, 80, seed=7)
    alone = prior_variance.clone()
    alone[1:] = 0.0
    precision, score = GaussianRegressionPosterior(
        markers, response, weight, unit, alone
    ).marker_evidence()
    z = standardized(markers)[:, 0]
    information = unit**2 * (weight * z[:, None] ** 2).sum(0)
    torch.testing.assert_close(precision[0], information)
    torch.testing.assert_close(
        score[0] / precision[0],
        (weight * z[:, None] * response).sum(0) / (unit * (weight * z[:, None] ** 2).sum(0)),
    )


def test_draws_have_the_joint_posterior_covariance():
    """Matheron draws against the exact covariance, along the directions that matter: the fitted
    values ``unit Z b``, whose posterior variance is below the noise variance ``1 / w``, and a
    few random directions. Each sample variance over 4,000 draws has a relative Monte-Carlo SD
    of sqrt(2 / 4000) = 0.022; the tolerance is 4 of them. Independent draws with the exact
    marginal variances give the fitted values a variance 200 to 9,000 times too large."""
    markers, *args = regression(20, 60, seed=4)
    posterior = GaussianRegressionPosterior(markers, *args)
    torch.manual_seed(0)
    draws = posterior.sample((4000,))  # [N, M, K]
    z = standardized(markers)
    generator = torch.Generator().manual_seed(1)
    directions = torch.cat([z, torch.randn(5, z.shape[1], generator=generator, dtype=z.dtype)])
    tolerance = 4 * (2 / 4000) ** 0.5
    for k, dense in enumerate(dense_posteriors(markers, *args)):
        exact = (directions @ dense.covariance_matrix * directions).sum(-1)
        sampled = (draws[..., k] @ directions.T).var(0)
        ratio = sampled / exact
        assert (ratio - 1).abs().max() < tolerance, ratio
        mean_error = (draws[..., k].mean(0) - dense.mean) / dense.variance.sqrt() * 4000**0.5
        assert mean_error.abs().max() < 4.5
        independent = (z**2 @ dense.variance) / exact[: z.shape[0]]
        assert independent.min() > 100


@pytest.mark.parametrize("draws", [(), (2,)])
def test_zero_weights_give_the_prior(draws):
    markers, response, weight, unit, prior_variance = regression(15, 40, seed=5)
    posterior = GaussianRegressionPosterior(
        markers, response, torch.zeros_like(weight), unit, prior_variance
    )
    assert (posterior.mean == 0).all()
    value = posterior.sample(draws)
    assert value.shape == (*draws, 40, 2)
    prior = torch.distributions.Normal(0.0, prior_variance.sqrt())
    torch.testing.assert_close(posterior.log_prob(value), prior.log_prob(value).sum((-1, -2)))


def test_rescaled_equals_the_posterior_of_the_scaled_prior():
    """Rescaling the stored Gram matrices gives the posterior built from scratch with the
    prior variances multiplied per curve parameter."""
    markers, response, weight, unit, prior_variance = regression(30, 80, seed=4)
    factor = torch.tensor([0.3, 5.0], dtype=torch.float64)
    rescaled = GaussianRegressionPosterior(
        markers, response, weight, unit, prior_variance
    ).rescaled(factor)
    fresh = GaussianRegressionPosterior(markers, response, weight, unit, prior_variance * factor)
    torch.testing.assert_close(rescaled.mean, fresh.mean)
    values = fresh.sample((2,))
    torch.testing.assert_close(rescaled.log_prob(values), fresh.log_prob(values))


def dense_log_marginal(markers, response, weight, unit, prior_variance, ratio):
    """``log N(y_k; 0, unit_k^2 Z D_k Z' ratio_k + W_k^-1)`` per curve parameter, for each row
    of ``ratio [G, K]``, by dense ``V x V`` algebra: ``[G, K]``."""
    z = standardized(markers)
    out = torch.empty(ratio.shape, dtype=torch.float64)
    for k in range(unit.numel()):
        genetic = unit[k] ** 2 * (z * prior_variance[:, k]) @ z.T
        for g, a in enumerate(ratio[:, k]):
            covariance = a * genetic + torch.diag(1 / weight[:, k])
            normal = torch.distributions.MultivariateNormal(
                torch.zeros(len(covariance), dtype=torch.float64), covariance
            )
            out[g, k] = normal.log_prob(response[:, k])
    return out


def test_log_scale_posterior_is_the_laplace_approximation_of_the_marginal():
    """Mode and curvature of ``log p(y | s) + log p(s) + log s`` in ``log s``, the effects
    integrated out, against dense ``V x V`` marginal likelihoods on a fine grid."""
    markers, response, weight, unit, prior_variance = regression(25, 60, seed=5)
    posterior = GaussianRegressionPosterior(markers, response, weight, unit, prior_variance)
    reference = torch.tensor([0.7, 1.3], dtype=torch.float64)
    prior = torch.distributions.HalfCauchy(torch.tensor([1.0, 2.0], dtype=torch.float64))
    mode, sd = posterior.log_scale_posterior(prior, reference)

    step = 1e-3
    grid = torch.arange(-3.0, 3.0, step, dtype=torch.float64)[:, None] + reference.log()
    ratio = torch.exp(2 * (grid - reference.log()))
    values = (
        dense_log_marginal(markers, response, weight, unit, prior_variance, ratio)
        + prior.log_prob(grid.exp())
        + grid
    )
    best = values.argmax(0)
    columns = torch.arange(2)
    assert ((best > 0) & (best < len(grid) - 1)).all()
    torch.testing.assert_close(mode, grid[best, columns], atol=2 * step, rtol=0)
    curvature = (
        values[best - 1, columns] - 2 * values[best, columns] + values[best + 1, columns]
    ) / step**2
    torch.testing.assert_close(sd, (-curvature).rsqrt(), rtol=0.01, atol=0)


def test_log_scale_posterior_covers_the_true_genetic_sd():
    """Ridge regression simulated from its prior, ``b ~ N(0, sigma^2 / M)`` with ``M >> V``:
    the Laplace posterior of ``log sigma`` puts the true value within 3 of its SDs, for
    each of 5 seeds; it fails if the data term or the Jacobian is dropped (the mode then sits
    at the prior's)."""
    n_varieties, n_markers, truth = 300, 3000, torch.tensor([0.5, 2.0], dtype=torch.float64)
    for seed in range(5):
        markers = genotypes(n_varieties, n_markers, seed, structured=True)
        z = standardized(markers)
        generator = torch.Generator().manual_seed(seed)
        effects = truth * torch.randn(n_markers, 2, generator=generator, dtype=torch.float64)
        noise_sd = torch.tensor([0.3, 1.0], dtype=torch.float64)
        noise = noise_sd * torch.randn(n_varieties, 2, generator=generator, dtype=torch.float64)
        response = z @ effects / n_markers**0.5 + noise
        weight = (noise_sd**-2).expand(n_varieties, 2)
        start = torch.tensor([5.0, 0.05], dtype=torch.float64)  # far from the truth
        prior_variance = (start**2 / n_markers).expand(n_markers, 2)
        posterior = GaussianRegressionPosterior(
            markers, response, weight, torch.ones(2, dtype=torch.float64), prior_variance
        )
        prior = torch.distributions.HalfNormal(torch.tensor([5.0, 5.0], dtype=torch.float64))
        mode, sd = posterior.log_scale_posterior(prior, start)
        assert ((mode - truth.log()).abs() < 3 * sd).all(), (seed, mode.exp(), sd)
        assert (sd < 0.2).all()
