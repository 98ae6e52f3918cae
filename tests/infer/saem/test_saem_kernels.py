"""E-step kernels: each leaves a known Gaussian target invariant."""

import pytest
import torch

from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.kernels import Target

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


@pytest.mark.parametrize("kernel", ["rwm", "mala", "hmc"])
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
