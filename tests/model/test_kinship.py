"""The kinship (GBLUP) form: relationship matrix, exact equivalence with the marker-effects form
on a linear-Gaussian toy (marginal density and BLUP back-solve), and its use in ``g2was``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.data.genotypes import MISSING_DOSAGE
from pyro_nlme.model.kinship import (
    blup_marker_effects,
    genomic_relationship,
    kinship_genetic_values,
    relationship_factor,
)
from pyro_nlme.model.priors import marker_effects

N_VARIETIES, N_MARKERS = 7, 40
GENETIC_SD = torch.tensor([0.7, 1.3], dtype=torch.float64)
NOISE_SD = 0.4


def make_markers(seed: int = 0, missing: bool = False) -> GenotypeMatrix:
    """Random dosages with one monomorphic marker (and optionally one missing genotype)."""
    rng = np.random.default_rng(seed)
    dosages = rng.integers(0, 3, size=(N_VARIETIES, N_MARKERS)).astype(np.int8)
    dosages[:, 3] = 1
    if missing:
        dosages[2, 5] = MISSING_DOSAGE
    return GenotypeMatrix.from_dosages(dosages, [f"m{i}" for i in range(N_MARKERS)])


def standardized(markers: GenotypeMatrix) -> torch.Tensor:
    return markers.standardized().double()


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("block_rows", [1, 3, 256])
def test_relationship_is_z_zt_over_m_in_any_row_blocks(missing, block_rows):
    markers = make_markers(missing=missing)
    z = standardized(markers)
    relationship = genomic_relationship(markers, block_rows=block_rows)
    torch.testing.assert_close(relationship, z @ z.T / N_MARKERS, rtol=0, atol=1e-12)
    assert torch.equal(relationship, relationship.T)
    # VanRaden scaling: mean diagonal = share of polymorphic markers (no missing genotypes).
    if not missing:
        assert relationship.diagonal().mean().item() == pytest.approx(1 - 1 / N_MARKERS)
        # Columns centred over the varieties: K 1 = 0 (up to the float32 standardisation).
        assert relationship.sum(1).abs().max().item() < 1e-6


def test_jitter_is_added_to_the_diagonal():
    markers = make_markers()
    relationship = genomic_relationship(markers)
    assert torch.linalg.eigvalsh(relationship)[0].item() < 1e-7
    jittered = genomic_relationship(markers, jitter=1e-6)
    torch.testing.assert_close(
        jittered - relationship, 1e-6 * torch.eye(N_VARIETIES, dtype=torch.float64)
    )
    assert torch.linalg.eigvalsh(jittered)[0].item() > 0.9e-6
    torch.linalg.cholesky(jittered)


def test_factor_is_an_exact_square_root_of_a_singular_relationship():
    relationship = genomic_relationship(make_markers())
    factor = relationship_factor(relationship)
    torch.testing.assert_close(factor @ factor.T, relationship, rtol=0, atol=1e-12)


def test_factor_is_the_same_whatever_signs_the_solver_picks(monkeypatch):
    """Eigenvector signs are the solver's choice (LAPACK and CUDA differ): the factor fixes
    them, so a solver returning every other eigenvector negated gives the same factor."""
    relationship = genomic_relationship(make_markers())
    factor = relationship_factor(relationship)
    kept = factor.norm(dim=0) > 1e-6
    largest = factor[:, kept].abs().argmax(dim=0)
    assert (factor[:, kept].gather(0, largest[None]) > 0).all()
    eigh = torch.linalg.eigh

    def flipping_eigh(matrix):
        values, vectors = eigh(matrix)
        return values, vectors * torch.where(torch.arange(len(values)) % 2 == 0, 1.0, -1.0)

    monkeypatch.setattr(torch.linalg, "eigh", flipping_eigh)
    torch.testing.assert_close(relationship_factor(relationship), factor, rtol=0, atol=0)


def linear_gaussian_toy(markers: GenotypeMatrix, form: str, y: torch.Tensor) -> None:
    """``y[v, k] ~ Normal(g[v, k], NOISE_SD)`` with genetic values from the effects form
    (``priors.marker_effects``, as ``g2was`` samples them) or the kinship form
    (``kinship``: non-centred, ``kinship_centred``: centred)."""
    if form == "effects":
        beta = marker_effects(SimpleNamespace(n_markers=markers.n_markers), GENETIC_SD)
        genetic = standardized(markers) @ beta
    else:
        parametrization = "centred" if form == "kinship_centred" else "noncentred"
        genetic = kinship_genetic_values(markers, GENETIC_SD, parametrization=parametrization)
    pyro.sample("y", dist.Normal(genetic, NOISE_SD).to_event(2), obs=y)


def gaussian_posterior(markers: GenotypeMatrix, form: str, y: torch.Tensor):
    """Exact log marginal density ``log p(y)`` and posterior mean of the latent of the toy.

    The log joint is quadratic in the latent, so one Newton step from 0 reaches the posterior
    mean and the Laplace formula is exact:
    ``log p(y) = log p(y, z*) + d/2 log(2 pi) - 1/2 log det H``.
    """
    trace = poutine.trace(linear_gaussian_toy).get_trace(markers, form, y)
    (name,) = [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    shape = trace.nodes[name]["value"].shape

    def log_joint(flat: torch.Tensor) -> torch.Tensor:
        conditioned = poutine.condition(linear_gaussian_toy, data={name: flat.reshape(shape)})
        return poutine.trace(conditioned).get_trace(markers, form, y).log_prob_sum()

    zero = torch.zeros(math.prod(shape), dtype=torch.float64)
    gradient = torch.autograd.functional.jacobian(log_joint, zero)
    hessian = -torch.autograd.functional.hessian(log_joint, zero)
    mode = torch.linalg.solve(hessian, gradient)
    log_marginal = (
        log_joint(mode)
        + 0.5 * mode.numel() * math.log(2 * math.pi)
        - 0.5 * torch.linalg.slogdet(hessian)[1]
    )
    return log_marginal.item(), mode.reshape(shape), name


def closed_form_log_marginal(relationship: torch.Tensor, y: torch.Tensor) -> float:
    eye = torch.eye(relationship.shape[0], dtype=torch.float64)
    return sum(
        dist.MultivariateNormal(
            torch.zeros_like(y[:, k]), GENETIC_SD[k] ** 2 * relationship + NOISE_SD**2 * eye
        ).log_prob(y[:, k])
        for k in range(y.shape[1])
    ).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_kinship_and_effects_forms_have_the_same_marginal_density(seed):
    markers = make_markers(seed)
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(N_VARIETIES, 2, generator=generator, dtype=torch.float64)
    effects, _, effects_site = gaussian_posterior(markers, "effects", y)
    kinship, _, kinship_site = gaussian_posterior(markers, "kinship", y)
    centred, _, centred_site = gaussian_posterior(markers, "kinship_centred", y)
    assert (effects_site, kinship_site) == ("marker_effect", "genetic_value_raw")
    assert centred_site == "genetic_value_component"
    assert kinship == pytest.approx(effects, abs=1e-8)
    # The centred form drops the null direction of K (variance 0 in every form).
    assert centred == pytest.approx(effects, abs=1e-6)
    assert effects == pytest.approx(
        closed_form_log_marginal(genomic_relationship(markers), y), abs=1e-8
    )
    # The comparison is sensitive: a relationship matrix on raw (unstandardised) dosages, or
    # one scaled by the polymorphic markers only, gives a clearly different density.
    raw = markers.dosages.double()
    wrong_scale = genomic_relationship(markers) * N_MARKERS / (N_MARKERS - 1)
    for wrong in ((raw - raw.mean(0)) @ (raw - raw.mean(0)).T / N_MARKERS, wrong_scale):
        assert abs(closed_form_log_marginal(wrong, y) - effects) > 1e-3


def test_blup_back_solve_of_the_kinship_posterior_is_the_effects_posterior_mean():
    markers = make_markers(3)
    y = torch.randn(N_VARIETIES, 2, generator=torch.Generator().manual_seed(3)).double()
    _, effects_mean, _ = gaussian_posterior(markers, "effects", y)
    _, raw_mean, _ = gaussian_posterior(markers, "kinship", y)
    genetic_mean = relationship_factor(genomic_relationship(markers)) @ raw_mean * GENETIC_SD
    back_solved = blup_marker_effects(markers, genetic_mean, block_rows=3)
    # 1e-7: the float32 standardisation leaves K with an eigenvalue ~1e-14 instead of 0 (K 1 ~
    # 1e-7); the back-solve drops that direction, the effects posterior keeps ~1e-7 of it.
    torch.testing.assert_close(back_solved, effects_mean, rtol=0, atol=1e-7)
    # The back-solve reproduces the genetic values and is the minimum-norm solution.
    z = standardized(markers)
    torch.testing.assert_close(z @ back_solved, genetic_mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(back_solved, torch.linalg.pinv(z) @ genetic_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(
        blup_marker_effects(markers, genetic_mean[:, 0]), back_solved[:, 0], rtol=0, atol=1e-12
    )


@pytest.fixture(scope="module")
def simulated():
    from pyro_nlme.data import load_data
    from pyro_nlme.simulate import DesignConfig, simulate_design

    sim = simulate_design(
        DesignConfig(n_varieties=6, n_markers=50, n_days=8, n_chromosomes=2), seed=0
    )
    return load_data(sim.phenotypes, markers=sim.genotype_table())


def test_g2was_kinship_form_sites_and_prior_covariance(simulated):
    from pyro_nlme.infer.util import model_structure
    from pyro_nlme_models.g2was import g2was

    structure = model_structure(g2was, simulated, marker_form="kinship")
    assert "marker_effect" not in structure.population
    assert structure.population["genetic_value_raw"].shape == (6, 3)
    assert structure.deterministic["genetic_value"].shape == (6, 3)
    assert "marker_effect" in model_structure(g2was, simulated).population

    genetic_sd = torch.tensor([0.2, 0.5, 1.5])

    def genetic_values(raw: torch.Tensor) -> torch.Tensor:
        conditioned = poutine.condition(
            g2was, data={"genetic_value_raw": raw, "genetic_sd": genetic_sd}
        )
        trace = poutine.trace(conditioned).get_trace(simulated, marker_form="kinship")
        return trace.nodes["genetic_value"]["value"]

    jacobian = torch.autograd.functional.jacobian(genetic_values, torch.zeros(6, 3))
    relationship = genomic_relationship(simulated.markers).float()
    for k in range(3):
        linear_map = jacobian[:, k, :, k]
        torch.testing.assert_close(
            linear_map @ linear_map.T, genetic_sd[k] ** 2 * relationship, rtol=0, atol=1e-5
        )


def test_kinship_parametrization_is_checked():
    with pytest.raises(ValueError, match="parametrization"):
        kinship_genetic_values(make_markers(), GENETIC_SD, parametrization="partial")


def test_g2was_kinship_form_subsamples_varieties_and_refuses_unknown_forms(simulated):
    from pyro_nlme_models.g2was import g2was

    # The non-centred latents are population-level: given them the varieties are independent,
    # so the variety plate can be subsampled; the genetic values of all varieties are computed.
    trace = poutine.trace(g2was).get_trace(simulated, subsample_size=2, marker_form="kinship")
    assert trace.nodes["genetic_value"]["value"].shape == (6, 3)
    assert trace.nodes["obs"]["value"].shape[0] == 2
    with pytest.raises(ValueError, match="marker_form"):
        poutine.trace(g2was).get_trace(simulated, marker_form="gblup")
