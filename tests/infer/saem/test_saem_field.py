"""The kernel form of the marker-effect (ridge) M-step against the p x p primal solution, and
the standard errors at a singular random-effect covariance."""

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nlme.data import GenotypeMatrix, NLMEData, load_data
from pyro_nlme.infer.saem import field, fisher, mstep
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.model import (
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.priors import marker_effects
from pyro_nlme_models.soybean import soybean


def _genotypes(n_varieties: int, n_markers: int, seed: int = 0) -> GenotypeMatrix:
    generator = torch.Generator().manual_seed(seed)
    dosages = torch.randint(0, 3, (n_varieties, n_markers), generator=generator).to(torch.int8)
    return GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(n_markers)])


def test_kernel_form_equals_primal_ridge():
    """p = 40 markers > n = 9 varieties: the kernel-form conditional of g = Z beta equals the
    one from the p x p system, and the kernel-form SD update is the fixed point of the primal
    EM update (which adds the prior variance of the p - r directions Z does not see)."""
    markers = _genotypes(9, 40)
    n_markers = markers.n_markers
    z = markers.standardized().double()
    vectors, values = field.kernel(markers, torch.float64)
    rank = values.numel()
    generator = torch.Generator().manual_seed(1)
    sd = torch.tensor(0.7, dtype=torch.float64)
    precision = torch.rand(9, generator=generator, dtype=torch.float64) + 0.5
    rbar = torch.randn(2, 9, generator=generator, dtype=torch.float64)
    posterior = field.genetic_posterior(vectors, values, sd, precision, precision * rbar)

    # Primal: beta | rbar ~ Normal(A^{-1} Z^T P rbar, A^{-1}), A = Z^T P Z + M / sd^2 I_p.
    a = z.T @ (precision[:, None] * z) + n_markers / sd**2 * torch.eye(n_markers).double()
    beta_mean = torch.linalg.solve(a, z.T @ (precision * rbar).T)  # [p, C]
    beta_cov = torch.linalg.inv(a)
    torch.testing.assert_close(vectors @ posterior.mean, z @ beta_mean, rtol=1e-8, atol=1e-10)
    kernel_cov = vectors @ torch.cholesky_inverse(posterior.precision_cholesky) @ vectors.T
    torch.testing.assert_close(kernel_cov, z @ beta_cov @ z.T, rtol=1e-8, atol=1e-10)

    # SD updates: kernel E[g' K^+ g] / r; primal M E[beta' beta] / p.
    second = (posterior.mean**2).mean(1) + posterior.variance
    kernel_update = (second / values).sum() / rank
    primal_update = (beta_mean**2).sum(0).mean() + beta_cov.trace()  # M / p = 1
    expected = (rank * kernel_update + (n_markers - rank) * sd**2) / n_markers
    torch.testing.assert_close(primal_update, expected, rtol=1e-8, atol=0.0)
    # The BLUP back-solve of E[g | rbar] is the primal ridge solution itself.
    back_solved = field.blup_marker_effects(markers, (vectors @ posterior.mean).float())
    torch.testing.assert_close(back_solved, beta_mean.to(back_solved), rtol=1e-4, atol=1e-6)


@nlme_model()
def linear_genetic(data: NLMEData, subsample_size: int | None = None) -> torch.Tensor:
    """``y[v, s, t] = scenario_mean[s] + g[v] + e[v, s] + noise``, ``g = Z beta``: g2was's
    genetic structure with a constant curve, so that the marginal likelihood is Gaussian."""
    one = torch.ones(1, dtype=data.times.dtype)
    scenario_mean = pyro.sample(
        "scenario_mean", dist.Normal(0 * one, 10 * one).expand([data.n_scenarios, 1]).to_event(2)
    )
    genetic_sd = pyro.sample("genetic_sd", dist.HalfNormal(one).to_event(1))
    effect_sd = pyro.sample("variety_scenario_sd", dist.HalfNormal(one).to_event(1))
    noise_sd = pyro.sample("noise_sd", dist.HalfNormal(one[0]))
    beta = marker_effects(data, genetic_sd)
    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        genetic = batch.markers.standardized_matmul(beta)[:, None, None, None, :]
        with scenario_plate(data):
            effect = pyro.sample(
                "variety_scenario_effect", dist.Normal(0 * effect_sd, effect_sd).to_event(1)
            )
            phi = scenario_mean[:, None, None, :] + genetic + effect
            with plant_plate(data), time_plate(data):
                return observe(batch, dist.Normal(phi[..., 0], noise_sd))


LINEAR_TRUTH = {
    "scenario_mean": torch.tensor([[1.0], [2.0]]),
    "genetic_sd": torch.tensor([0.8]),
    "variety_scenario_sd": torch.tensor([0.5]),
    "noise_sd": torch.tensor(0.3),
}
N_LINEAR, TIMES = 30, 4


def _linear_data(seed: int = 0) -> NLMEData:
    markers = _genotypes(N_LINEAR, 50, seed)
    z = markers.standardized().double()
    generator = torch.Generator().manual_seed(seed + 1)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    genetic = z @ normal(50) * 0.8 / 50**0.5
    cell = (
        LINEAR_TRUTH["scenario_mean"][:, 0].double() + genetic[:, None] + 0.5 * normal(N_LINEAR, 2)
    )
    values = cell[..., None] + 0.3 * normal(N_LINEAR, 2, TIMES)
    v, s, t = np.meshgrid(range(N_LINEAR), range(2), range(TIMES), indexing="ij")
    frame = pd.DataFrame(
        {
            "variety": [f"v{i:02d}" for i in v.ravel()],
            "scenario": [f"s{j}" for j in s.ravel()],
            "time": t.ravel().astype(float),
            "value": values.numpy().ravel(),
        }
    )
    genotypes = pd.DataFrame(markers.dosages.numpy(), columns=markers.marker_ids)
    genotypes.insert(0, "variety", [f"v{i:02d}" for i in range(N_LINEAR)])
    return load_data(frame, markers=genotypes)


def _exact_log_likelihood(joint: JointModel, theta: torch.Tensor) -> torch.Tensor:
    """The linear model's marginal log-likelihood (Gaussian, the marker effects integrated)."""
    values = joint.population_values(theta)
    data = joint.data
    relationship = field.genomic_relationship(data.markers, dtype=torch.float64)
    n, s = data.n_varieties, data.n_scenarios
    cells = torch.kron(relationship, torch.ones(s, s, dtype=torch.float64))
    covariance = values["genetic_sd"][0] ** 2 * cells + values["variety_scenario_sd"][0] ** 2 * (
        torch.eye(n * s, dtype=torch.float64)
    )
    block = torch.ones(TIMES, TIMES, dtype=torch.float64)
    covariance = torch.kron(covariance, block) + values["noise_sd"] ** 2 * torch.eye(
        n * s * TIMES, dtype=torch.float64
    )
    mean = values["scenario_mean"][:, 0].repeat(n).repeat_interleave(TIMES)
    y = data.values.double().reshape(-1)
    return dist.MultivariateNormal(mean, covariance_matrix=covariance).log_prob(y)


def _exact_posterior_draws(joint, theta, n_chains, n_draws, seed=0) -> torch.Tensor:
    """``[C, N, V, D]`` independent draws of the centred latents from ``p(u | y, theta)``."""
    values = joint.population_values(theta)
    data = joint.data
    n, s = data.n_varieties, data.n_scenarios
    relationship = field.genomic_relationship(data.markers, dtype=torch.float64)
    prior = values["genetic_sd"][0] ** 2 * torch.kron(
        relationship, torch.ones(s, s, dtype=torch.float64)
    ) + values["variety_scenario_sd"][0] ** 2 * torch.eye(n * s, dtype=torch.float64)
    location = -joint.z_from_u(
        torch.zeros(n, joint.z_dim, dtype=torch.float64), theta, joint.rows(1)
    )
    mean_y = data.values.double()[:, :, 0, :].mean(-1).reshape(-1)  # [V * S]
    centre = location.reshape(-1)  # the model's latents are [S, 1] per variety
    precision = TIMES / values["noise_sd"] ** 2
    covariance = torch.linalg.inv(torch.linalg.inv(prior) + precision * torch.eye(n * s).double())
    mean = covariance @ (precision * (mean_y - centre))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_chains, n_draws, n * s, generator=generator, dtype=torch.float64)
    x = mean + noise @ torch.linalg.cholesky(covariance).T
    return (x + centre).reshape(n_chains, n_draws, n, joint.z_dim)


def test_genetic_block_information_equals_the_exact_one():
    """Louis' information of the genetic block (genetic SD, variety x scenario SD, scenario
    means) from draws of ``p(u | y)``, the marker effects integrated, equals the block of the
    exact observed information of the linear model's Gaussian marginal likelihood, within
    its jackknife Monte-Carlo error (16 chains x 1,000 exact posterior draws)."""
    data = _linear_data()
    joint = JointModel(linear_genetic, data)
    theta = joint.theta_from_values({**LINEAR_TRUTH, "marker_effect": torch.zeros(50, 1)})
    plan = mstep.analyse(joint, theta)
    markers = plan.marker_field
    assert markers is not None and markers.effect_site == "variety_scenario_effect"
    draws = _exact_posterior_draws(joint, theta, n_chains=16, n_draws=1000)
    block = field.genetic_information(markers, plan, joint, theta, draws)

    exact = -torch.autograd.functional.hessian(lambda t: _exact_log_likelihood(joint, t), theta)[
        block.indices[:, None], block.indices
    ]
    n_chains = block.leave_one_chain_out.shape[0]
    spread = block.leave_one_chain_out - block.leave_one_chain_out.mean(0)
    mc_error = ((n_chains - 1) / n_chains * (spread**2).sum(0)).sqrt()
    z = (block.information - exact) / mc_error
    assert z.abs().max() < 5, (block.information, exact, mc_error)
    relative = (block.information - exact).abs() / exact.diagonal().sqrt().outer(
        exact.diagonal().sqrt()
    )
    assert relative.max() < 0.1, relative


def test_standard_errors_hold_a_boundary_covariance_fixed(soybean_data):
    """At correlations of +-0.9999 the covariance is detected as on the boundary; the SEs of
    the held parameters are NaN and the others come from the information's sub-block."""
    joint = JointModel(soybean, soybean_data)
    theta = joint.initial_theta()
    plan = mstep.analyse(joint, theta)
    assert fisher.boundary_covariances(joint, theta, plan) == []
    g = plan.full[0]
    covariance = torch.tensor([[1.0, 0.9999, 0.3], [0.9999, 1.0, 0.3], [0.3, 0.3, 1.0]])
    singular = mstep.set_covariance(joint, theta, g, covariance.double())
    ((site, smallest, held, *_),) = fisher.boundary_covariances(joint, singular, plan)
    assert site == g.site and smallest < fisher.BOUNDARY_EIGENVALUE

    active = torch.tensor([i for i in range(joint.theta_dim) if i not in set(held)])
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(len(active), len(active), generator=generator, dtype=torch.float64)
    info = root @ root.T + torch.eye(len(active), dtype=torch.float64)
    natural = fisher.natural_covariance(info, lambda t: t.clone(), singular, active)
    se = natural.covariance.diagonal()
    assert torch.isnan(se[held]).all() and natural.singular[held].all()
    torch.testing.assert_close(se[active], torch.linalg.inv(info).diagonal())


def test_scenario_means_are_locations_whatever_the_number_of_markers():
    """With 5,000 marker effects the plan still takes every scenario mean of g2was as the
    location of its individual parameters (closed-form M-step). Probes that moved each effect
    by 0.3 made genetic values of SD about 20, saturated the curves, and left the log rate and
    inflection means to the gradient M-step (at 60,000 markers they were still drifting after
    300 iterations)."""
    from pyro_nlme.simulate import DesignConfig, simulate_design
    from pyro_nlme_models.g2was import g2was

    sim = simulate_design(DesignConfig(n_varieties=30, n_heldout=0, n_markers=5000), seed=0)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    joint = JointModel(g2was, data, {"marker_form": "effects"})
    plan = mstep.analyse(joint, joint.initial_theta())
    means = next(b for b in joint.population if b.name == "scenario_mean")
    assert plan.marker_field is not None
    assert sorted(plan.shift.theta_index.tolist()) == list(range(means.offset, means.offset + 9))


@pytest.mark.slow
def test_fit_with_markers_integrates_them_out():
    """g2was with markers (effects form) runs through the kernel form: the plan detects the
    field, the marker effects are exported as the back-solve of E[g | y], the genetic SDs are
    estimated and get their SEs from the genetic block (with a Monte-Carlo error, two chains),
    with a message."""
    from pyro_nlme.data import load_data
    from pyro_nlme.infer.saem import SAEMConfig, fit_saem
    from pyro_nlme.simulate import DesignConfig, simulate_design
    from pyro_nlme_models.g2was import g2was

    sim = simulate_design(DesignConfig(n_varieties=6, n_heldout=0, n_markers=40), seed=0)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    config = SAEMConfig(
        iterations=(3, 2),
        chains=2,
        kernel="mala",
        genetic_sweeps=5,
        progress=False,
        importance_samples=50,
        fisher_samples=50,
        conditional_iterations=4,
        draws=2,
    )
    result = fit_saem(g2was, data, config, model_kwargs={"marker_form": "effects"})
    summary = result.population_summary.set_index("parameter")
    assert not any(label.startswith("marker_effect") for label in summary.index)
    genetic = summary.loc[[f"genetic_sd[{k}]" for k in ("log_asymptote", "log_rate", "inflection")]]
    assert (genetic["estimate"] > 0).all()
    # 5 sweeps x 2 chains at an estimate after 5 iterations: the block's information is not
    # positive definite, so the genetic SDs have no SE, and the warning says so.
    assert genetic["se"].isna().all()
    assert any("no SE for genetic_sd[log_asymptote]" in w for w in result.warnings)
    assert "se_mcse" in result.inference_data["point_estimate"]
    assert summary.loc["noise_sd", "se"] > 0
    assert result.population_summary.attrs["n_parameters"] == 9 + 3 * 3 + 1
    assert any("marker effects are integrated out" in w for w in result.warnings)
    effects = result.inference_data.posterior["marker_effect"]
    assert effects.shape[-2:] == (40, 3) and np.isfinite(effects.values).all()


@pytest.mark.slow
def test_saem_genetic_sd_standard_error_equals_the_exact_one():
    """On the linear model, SAEM's SE of the genetic SD (genetic block, g integrated, from the
    E-step and Gibbs sweeps at the estimate) equals the exact one at the same estimate (the
    inverse of the block of the exact observed information of the Gaussian marginal likelihood),
    within 4 jackknife Monte-Carlo errors."""
    from pyro_nlme.infer.saem import SAEMConfig
    from pyro_nlme.infer.saem.algorithm import fit_saem_with_run

    data = _linear_data()
    config = SAEMConfig(
        iterations=(100, 100),
        chains=8,
        genetic_sweeps=300,
        importance_samples=500,
        fisher_samples=500,
        conditional_iterations=50,
        draws=10,
        progress=False,
    )
    result, joint, run = fit_saem_with_run(linear_genetic, data, config)
    summary = result.population_summary.set_index("parameter")
    block = run.genetic_information.indices
    exact = -torch.autograd.functional.hessian(
        lambda t: _exact_log_likelihood(joint, t), run.theta
    )[block[:, None], block]
    position = int((block == run.plan.marker_field.sd_index[0]).nonzero())
    sd = summary.loc["genetic_sd[0]", "estimate"]
    exact_se = sd * float(torch.linalg.inv(exact)[position, position].sqrt())  # delta method
    se = summary.loc["genetic_sd[0]", "se"]
    mcse = float(result.inference_data["point_estimate"]["se_mcse"].sel(parameter="genetic_sd[0]"))
    assert abs(se - exact_se) < 4 * mcse, (se, exact_se, mcse)
    assert abs(se - exact_se) < 0.1 * exact_se, (se, exact_se)
