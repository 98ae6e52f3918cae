"""The kernel form of the marker-effect (ridge) M-step against the p x p primal solution, and
the standard errors at a singular random-effect covariance."""

import numpy as np
import pytest
import torch

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.infer.saem import field, fisher, mstep
from pyro_nlme.infer.saem.joint import JointModel
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


@pytest.mark.slow
def test_fit_with_markers_integrates_them_out():
    """g2was with markers (effects form) runs through the kernel form: the plan detects the
    field, the marker effects are exported as the back-solve of E[g | y], the genetic SDs are
    estimated and reported without an SE (conditional likelihood), with a message."""
    from pyro_nlme.data import load_data
    from pyro_nlme.infer.saem import SAEMConfig, fit_saem
    from pyro_nlme.simulate import DesignConfig, simulate_design
    from pyro_nlme_models.g2was import g2was

    sim = simulate_design(DesignConfig(n_varieties=6, n_heldout=0, n_markers=40), seed=0)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    config = SAEMConfig(
        iterations=(3, 2),
        chains=1,
        kernel="mala",
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
    assert (genetic["estimate"] > 0).all() and genetic["se"].isna().all()
    assert summary.loc["noise_sd", "se"] > 0
    assert result.population_summary.attrs["n_parameters"] == 9 + 3 * 3 + 1
    assert any("marker effects are integrated out" in w for w in result.warnings)
    effects = result.inference_data.posterior["marker_effect"]
    assert effects.shape[-2:] == (40, 3) and np.isfinite(effects.values).all()
