"""E-step kernels: each leaves a known Gaussian target invariant."""

import pytest
import torch

from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.kernels import Target, curvature_root

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
SD = torch.tensor([0.5, 2.0], dtype=torch.float64)
PRIOR_SD = 3.0


def _target(n):
    # prior N(0, 3^2) per component; "likelihood" makes the posterior N(MEAN, SD^2).
    def density(u):
        prior = -0.5 * (u / PRIOR_SD).pow(2).sum(1)
        post = -0.5 * ((u - MEAN) / SD).pow(2).sum(1)
        return post, post - prior

    return Target(density, lambda: PRIOR_SD * torch.randn(n, 2, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["rwm", "mala", "hmc", "dense_mala"])
def test_kernel_targets_the_conditional(kernel):
    torch.manual_seed(0)
    n = 400
    target = _target(n)
    state = init_e_step(target)
    for _ in range(30):
        state, _ = e_step(state, target, kernel, adapt=True)
    draws = []
    for _ in range(60):
        state, rates = e_step(state, target, kernel, adapt=False)
        draws.append(state.position)
    draws = torch.stack(draws).reshape(-1, 2)
    torch.testing.assert_close(draws.mean(0), MEAN, atol=0.08, rtol=0)
    torch.testing.assert_close(draws.std(0), SD, rtol=0.06, atol=0)
    assert all(0.05 < r < 1.0 for r in rates.values())


# Nested Gaussian levels whose sums the data pin down (g2was's variety x scenario and plant
# effects): PAIRS pairs of components with prior SDs PRIOR_SDS, the data observe each pair's
# sum with SD 0.02.
PAIRS, NESTED_SUM_SD, NESTED_SUM = 5, 0.02, 1.5
PRIOR_SDS = torch.tensor([3.0, 0.3], dtype=torch.float64)


def _nested_target(n):
    prior_sd = PRIOR_SDS.repeat(PAIRS)

    def density(u):
        prior = -0.5 * (u / prior_sd).pow(2).sum(1)
        sums = u.reshape(n, PAIRS, 2).sum(2)
        loglik = -0.5 * ((sums - NESTED_SUM) / NESTED_SUM_SD).pow(2).sum(1)
        return prior + loglik, loglik

    return Target(density, lambda: prior_sd * torch.randn(n, 2 * PAIRS, dtype=torch.float64))


def _nested_posterior():
    """Mean ``[2]`` and covariance ``[2, 2]`` of one pair (pairs are independent)."""
    design = torch.ones(1, 2, dtype=torch.float64)
    precision = torch.diag(PRIOR_SDS**-2) + design.T @ design / NESTED_SUM_SD**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ design.T.squeeze(1) * NESTED_SUM / NESTED_SUM_SD**2
    return mean, covariance


def test_curvature_root_is_the_gaussian_posterior_covariance():
    target = _nested_target(3)
    root, inverse_root = curvature_root(target.sample_prior(), target)
    _, pair = _nested_posterior()
    covariance = torch.block_diag(*[pair] * PAIRS)
    for r, inv in zip(root, inverse_root, strict=True):
        torch.testing.assert_close(r @ r.T, covariance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(inv @ r, torch.eye(2 * PAIRS, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["dense_mala", "mala"])
def test_dense_kernel_crosses_a_ridge_the_diagonal_one_cannot(kernel):
    """Independent chains (one per row) started where SAEM leaves them when a random-effect SD
    shrinks: the second component of each pair drawn with SD 3 instead of its prior's 0.3.
    After the schedule, the last draws must have the posterior's moments within 4 Monte-Carlo
    SEs (independent rows). The diagonal MALA kernel moves along the ridge (the second
    component at a fixed sum) by steps the size of the pinned direction, and its prior
    proposals are almost never accepted in 10 dimensions, so it fails."""
    torch.manual_seed(1)
    n = 500
    target = _nested_target(n)
    state = init_e_step(target)
    state = state._replace(position=3.0 * torch.randn(n, 2 * PAIRS, dtype=torch.float64))
    for _ in range(20):
        state, _ = e_step(state, target, kernel, adapt=True)
    for _ in range(20):
        state, _ = e_step(state, target, kernel, adapt=False)
    mean, covariance = _nested_posterior()
    draws = state.position.reshape(n, PAIRS, 2)
    sd = covariance.diagonal().sqrt()
    mean_z = (draws.mean(0) - mean) / (sd / n**0.5)
    sd_z = (draws.std(0) / sd - 1) * (2 * n) ** 0.5
    worst = float(torch.maximum(mean_z.abs().max(), sd_z.abs().max()))
    if kernel == "dense_mala":
        assert worst < 4, (mean_z, sd_z)
    else:
        assert worst > 10, (mean_z, sd_z)
