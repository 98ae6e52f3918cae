"""The joint posterior of marker effects in a Gaussian regression, against dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_marker_cavi import genotypes  # same folder: pytest puts it on the path

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.infer.guides.gaussian_regression import GaussianRegressionPosterior


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
