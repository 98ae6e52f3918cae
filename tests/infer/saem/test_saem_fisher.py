"""Louis' standard errors with a random-effect covariance held fixed at a singular value, against
the exact ones of a linear mixed model.

The model: ``y_it = (b0 + c_i b2 + eta_i0) + (b1 + c_i b3 + eta_i1) t + e_it``,
``eta_i ~ N(0, Omega)``, ``e_it ~ N(0, noise_sd^2)``, with ``Omega`` of correlation
``1 - 1e-6`` (the smallest eigenvalue of its correlation matrix is ``1e-6``, below
:data:`~pyro_nlme.infer.saem.fisher.BOUNDARY_EIGENVALUE`; Soybean's ML estimate has ``1.2e-6``).
The marginal likelihood is Gaussian in closed form, ``y_i ~ N(X_i beta, V_i)`` with
``V_i = Z_i Omega Z_i' + noise_sd^2 I``, so the observed information of ``(beta, noise_sd)``
with ``Omega`` fixed is exact (its ``beta`` block is ``sum_i X_i' V_i^{-1} X_i``).
"""

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.optimize
import scipy.stats
import torch

from pyro_nlme.data import NLMEData, load_data
from pyro_nlme.infer.saem import fisher, mstep
from pyro_nlme.infer.saem.common import conditional_run, make_target, reported
from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.infer.saem.likelihood import Proposal, importance_sampling
from pyro_nlme.model import (
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)

N_GROUPS, TIMES = 40, torch.arange(6.0)
BETA = torch.tensor([1.0, 0.5, 0.3, -0.2], dtype=torch.float64)  # b0, b1, b2, b3
EFFECT_SD = torch.tensor([1.0, 0.5], dtype=torch.float64)
CORRELATION = 1 - 1e-6
REPLICATES, DRAWS = 8, 1024


@nlme_model()
def linear_mixed(data: NLMEData, subsample_size: int | None = None) -> torch.Tensor:
    """A random intercept and slope per variety, with a group covariate on both."""
    n_covariates = data.covariate_design.shape[-1]
    scale = torch.full((2,), 10.0, dtype=data.times.dtype)
    intercept = pyro.sample("intercept", dist.Normal(torch.zeros_like(scale), scale).to_event(1))
    covariate_effect = pyro.sample(
        "covariate_effect",
        dist.Normal(torch.zeros_like(scale), scale).expand([n_covariates, 2]).to_event(2),
    )
    random_effect_sd = pyro.sample("random_effect_sd", dist.HalfNormal(scale).to_event(1))
    random_effect_corr = pyro.sample("random_effect_corr", dist.LKJCholesky(2, 1.0))
    noise_sd = pyro.sample("noise_sd", dist.HalfNormal(scale[0]))
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        fixed = intercept + batch.covariate_design @ covariate_effect
        effect = pyro.sample(
            "random_effect",
            dist.MultivariateNormal(
                torch.zeros_like(scale), scale_tril=random_effect_sd[..., None] * random_effect_corr
            ),
        )
        phi = fixed[:, None, None, None, :] + effect
        with scenario_plate(data), plant_plate(data), time_plate(data):
            return observe(batch, dist.Normal(phi[..., 0] + phi[..., 1] * batch.times, noise_sd))


def _simulate(seed: int = 0) -> NLMEData:
    """Data from a rank-1 covariance (correlation exactly 1), noise SD 0.3."""
    generator = torch.Generator().manual_seed(seed)
    group = (torch.arange(N_GROUPS) % 2).double()
    eta = torch.randn(N_GROUPS, 1, generator=generator, dtype=torch.float64) * EFFECT_SD
    level = BETA[0] + group * BETA[2] + eta[:, 0]
    slope = BETA[1] + group * BETA[3] + eta[:, 1]
    noise = 0.3 * torch.randn(N_GROUPS, len(TIMES), generator=generator, dtype=torch.float64)
    values = level[:, None] + slope[:, None] * TIMES + noise
    frame = pd.DataFrame(
        {
            "variety": [f"v{i:02d}" for i in range(N_GROUPS) for _ in TIMES],
            "time": TIMES.repeat(N_GROUPS).numpy(),
            "value": values.reshape(-1).numpy(),
            "group": ["b" if g else "a" for g in group.tolist() for _ in TIMES],
        }
    )
    return load_data(frame, covariate_columns=["group"], dtype=torch.float64)


def _omega() -> torch.Tensor:
    correlation = torch.tensor([[1.0, CORRELATION], [CORRELATION, 1.0]], dtype=torch.float64)
    return EFFECT_SD[:, None] * correlation * EFFECT_SD[None, :]


def _exact_log_likelihood(beta: torch.Tensor, noise_sd: torch.Tensor, data: NLMEData):
    """``sum_i log N(y_i; X_i beta, Z_i Omega Z_i' + noise_sd^2 I)`` (every time observed)."""
    times = data.times[:, 0, 0]
    group = data.covariate_design[:, 0]
    ones = torch.ones_like(times)
    design = torch.stack([ones, times, group[:, None] * ones, group[:, None] * times], -1)
    z = torch.stack([ones, times], -1)  # [V, T, 2]
    covariance = z @ _omega() @ z.transpose(-1, -2) + noise_sd**2 * torch.eye(times.shape[-1])
    mean = design @ beta
    return dist.MultivariateNormal(mean, covariance).log_prob(data.values[:, 0, 0]).sum(), design


def _exact_fit(data: NLMEData):
    """The exact ML of ``(beta, noise_sd)`` with ``Omega`` fixed (generalised least squares
    profiled over ``noise_sd``) and the inverse of the observed information there."""

    def gls(noise_sd):
        _, design = _exact_log_likelihood(BETA, noise_sd, data)
        times = data.times[:, 0, 0]
        z = torch.stack([torch.ones_like(times), times], -1)
        inverse = torch.linalg.inv(
            z @ _omega() @ z.transpose(-1, -2) + noise_sd**2 * torch.eye(times.shape[-1])
        )
        xvx = torch.einsum("vta,vts,vsb->ab", design, inverse, design)
        xvy = torch.einsum("vta,vts,vs->a", design, inverse, data.values[:, 0, 0])
        return torch.linalg.solve(xvx, xvy), xvx

    def profile(log_sd):
        noise_sd = torch.tensor(log_sd, dtype=torch.float64).exp()
        return -float(_exact_log_likelihood(gls(noise_sd)[0], noise_sd, data)[0])

    log_sd = scipy.optimize.minimize_scalar(profile, bounds=(-5.0, 2.0), method="bounded").x
    noise_sd = torch.tensor(log_sd, dtype=torch.float64).exp()
    beta, xvx = gls(noise_sd)
    point = torch.cat([beta, noise_sd[None]])
    hessian = torch.autograd.functional.hessian(
        lambda p: _exact_log_likelihood(p[:4], p[4], data)[0], point
    )
    # The reference's beta block is the textbook X' V^{-1} X.
    torch.testing.assert_close(-hessian[:4, :4], xvx, rtol=1e-10, atol=0.0)
    return beta, noise_sd, torch.linalg.inv(-hessian).diagonal().sqrt()


@pytest.fixture(scope="module")
def singular_fit():
    data = _simulate()
    beta, noise_sd, exact_se = _exact_fit(data)
    joint = JointModel(linear_mixed, data)
    cholesky = torch.linalg.cholesky(_omega() / (EFFECT_SD[:, None] * EFFECT_SD[None, :]))
    values = {
        "intercept": beta[:2],
        "covariate_effect": beta[2:].reshape(1, 2),
        "random_effect_sd": EFFECT_SD,
        "random_effect_corr": cholesky,
        "noise_sd": noise_sd,
    }
    theta = joint.theta_from_values(values)
    torch.manual_seed(0)
    plan = mstep.analyse(joint, theta)
    rows = joint.rows(4)
    state = init_e_step(make_target(joint, theta, rows))
    for _ in range(100):
        state, _ = e_step(state, make_target(joint, theta, rows), "rwm", adapt=True)
    posterior = conditional_run(joint, theta, state, rows, 4, "rwm", 200, 10)
    return joint, theta, plan, posterior, exact_se


def _louis_se(joint, theta, plan, posterior, seed, noncentred=True):
    (boundary,) = fisher.boundary_covariances(joint, theta, plan)
    active = torch.tensor([i for i in range(joint.theta_dim) if i not in set(boundary.indices)])
    proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=seed)
    likelihood = importance_sampling(joint, theta, proposal, DRAWS)
    information = fisher.louis_information(
        joint,
        theta,
        proposal,
        likelihood,
        DRAWS,
        indices=active,
        noncentred=fisher.noncentring(joint, [boundary]) if noncentred else None,
    )
    natural = fisher.natural_covariance(information, reported(joint).fn, theta, active)
    return natural.covariance.diagonal().sqrt()


def test_louis_standard_errors_at_a_singular_covariance_equal_exact(singular_fit):
    """SEs of the fixed effects and the noise SD with the singular covariance held fixed equal
    the exact ones within their Monte-Carlo error.

    Tolerance: the information is a ratio of importance-sampling averages over randomised
    quasi-Monte Carlo draws, whose error is estimated from ``R = 8`` independent
    randomisations (proposal seeds): the mean of the ``R`` SEs must be within
    ``t_{R-1}(0.9995) s / sqrt(R)`` of the exact SE (``s``: their SD across randomisations;
    a two-sided 0.1% test per parameter, 0.5% for the five). The self-normalised estimator's
    bias is ``O(1 / M)`` with ``M = 1024`` draws, below this. So that the test can fail, the
    Monte-Carlo error itself must be small: ``s / sqrt(R)`` below 0.5% of the SE (measured:
    below 0.01%, the mean within 1.4 of it from the exact SEs; with the latents fully centred,
    as before, the SEs were NaN, and fully non-centred their error was 7-13%)."""
    joint, theta, plan, posterior, exact = singular_fit
    labels = reported(joint).labels
    keep = [i for i, label in enumerate(labels) if not label.startswith("random_effect")]
    assert [labels[i] for i in keep] == [
        "intercept[0]",
        "intercept[1]",
        "covariate_effect[0,0]",
        "covariate_effect[0,1]",
        "noise_sd",
    ]
    se = torch.stack([_louis_se(joint, theta, plan, posterior, s)[keep] for s in range(REPLICATES)])
    mean, mcse = se.mean(0), se.std(0) / REPLICATES**0.5
    assert (mcse < 0.005 * exact).all(), (mcse / exact).tolist()
    tolerance = scipy.stats.t.ppf(0.9995, REPLICATES - 1) * mcse
    assert ((mean - exact).abs() < tolerance).all(), ((mean - exact) / mcse).tolist()


@pytest.mark.slow
def test_soybean_fit_has_standard_errors_at_its_boundary(soybean_data):
    """End to end through ``fit_saem``: Soybean's ML covariance is singular (correlations
    +-0.99999, ``docs/saem_benchmark.md``); the fit holds it (no SE for its SDs and
    correlations, with the warning) and every other parameter gets a finite, positive SE (they
    were all NaN with the centred coordinates). Their accuracy at a singular covariance is what
    the exact test above checks."""
    from pyro_nlme.infer.saem import SAEMConfig, fit_saem
    from pyro_nlme_models.soybean import soybean

    config = SAEMConfig(iterations=(300, 200), seed=1, progress=False, jit=True)
    result = fit_saem(soybean, soybean_data, config, model_kwargs={"likelihood": "proportional"})
    table = result.population_summary.set_index("parameter")
    held = table.index.str.startswith("random_effect")
    assert held.sum() == 6 and table.loc[held, "se"].isna().all()
    assert (table.loc[~held, "se"] > 0).all(), table.loc[~held, "se"]
    assert any("is singular at the estimate" in w for w in result.warnings)
