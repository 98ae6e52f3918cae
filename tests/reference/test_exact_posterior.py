"""The importance-sampling quantiles of the exact Orange reference."""

from __future__ import annotations

import numpy as np
import torch

from pyro_nlme.reference.exact_posterior import _weighted_quantiles


def test_weighted_quantiles_are_those_of_the_weighted_distribution():
    """On a discrete distribution: the smallest value whose CDF reaches ``p``."""
    theta = torch.tensor([[3.0, -1.0], [1.0, 0.0], [2.0, 5.0], [0.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # column 0 sorted: 0 (0.4), 1 (0.2), 2 (0.3), 3 (0.1): CDF 0.4, 0.6, 0.9, 1.0
    # column 1 sorted: -1 (0.1), 0 (0.2), 2 (0.4), 5 (0.3): CDF 0.1, 0.3, 0.7, 1.0
    value, _ = _weighted_quantiles(theta, weights, torch.tensor([0.05, 0.5, 0.95]))
    np.testing.assert_array_equal(value.numpy(), [[0.0, -1.0], [1.0, 2.0], [3.0, 5.0]])


def test_quantile_standard_errors_match_the_spread_over_seeds():
    """Self-normalised importance sampling of N(0, 1) from N(0, 2): the stated SEs of the 5,
    50 and 95% quantiles are within 25% of their SDs over 300 repetitions (the SD of an SD
    from 300 draws is about 4% of it)."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.95])
    proposal, target = torch.distributions.Normal(0.0, 2.0), torch.distributions.Normal(0.0, 1.0)
    values, errors = [], []
    for _ in range(300):
        draws = 2.0 * torch.randn(5000, 1, generator=generator, dtype=torch.float64)
        weights = torch.softmax((target.log_prob(draws) - proposal.log_prob(draws))[:, 0], 0)
        value, se = _weighted_quantiles(draws, weights, probs)
        values.append(value[:, 0])
        errors.append(se[:, 0])
    spread = torch.stack(values).std(0)
    stated = torch.stack(errors).mean(0)
    np.testing.assert_allclose(stated.numpy(), spread.numpy(), rtol=0.25)
    true = target.icdf(probs.double())
    bias = (torch.stack(values).mean(0) - true).abs()
    assert (bias < 4 * spread / 300**0.5).all()
