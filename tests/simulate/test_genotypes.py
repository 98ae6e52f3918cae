"""Tests of the genotype generator: layout, frequencies, structure, LD, standardisation."""

import numpy as np
import pytest

from pyro_nlme.simulate.genotypes import (
    ancestral_frequencies,
    assign_ancestry,
    balding_nichols,
    dosage_moments,
    marker_layout,
    simulate_genotypes,
    standardized_product,
)

SMALL = dict(
    n_chromosomes=19,
    n_subpopulations=4,
    fst=0.08,
    allele_frequency_shape=0.3,
    min_maf=0.05,
    ld_rho=0.95,
    admixed_fraction=0.0,
)


def small_panel(seed=0, n_individuals=40, n_markers=2_000, **overrides):
    return simulate_genotypes(
        np.random.default_rng(seed), n_individuals, n_markers, **(SMALL | overrides)
    )


def r2(a, b):
    """Squared correlation of matching columns of two matrices (polymorphic pairs only)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = (a * a).sum(axis=0) * (b * b).sum(axis=0)
    keep = denominator > 0
    return ((a * b).sum(axis=0) ** 2)[keep] / denominator[keep]


def test_marker_layout():
    chromosome, position, ids = marker_layout(10, 3)
    assert chromosome.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert position.tolist() == [1, 2, 3, 4, 1, 2, 3, 1, 2, 3]
    assert ids[:2] == ["chr01_000001", "chr01_000002"] and ids[-1] == "chr03_000003"
    with pytest.raises(ValueError):
        marker_layout(5, 6)


def test_shapes_dtypes_and_values():
    panel = small_panel()
    assert panel.dosages.shape == (40, 2_000) and panel.dosages.dtype == np.int8
    assert set(np.unique(panel.dosages)) <= {0, 1, 2}
    assert len(panel.marker_ids) == len(set(panel.marker_ids)) == 2_000
    assert panel.population_frequency.shape == (4, 2_000)
    np.testing.assert_array_equal(np.bincount(panel.subpopulation), [10, 10, 10, 10])
    np.testing.assert_array_equal(panel.ancestry.argmax(axis=1), panel.subpopulation)


def test_deterministic_per_seed():
    a, b, c = small_panel(seed=3), small_panel(seed=3), small_panel(seed=4)
    np.testing.assert_array_equal(a.dosages, b.dosages)
    np.testing.assert_array_equal(a.population_frequency, b.population_frequency)
    assert not np.array_equal(a.dosages, c.dosages)


def test_ancestral_frequencies_truncated_u_shape():
    p = ancestral_frequencies(np.random.default_rng(0), 50_000, 0.3, 0.05)
    assert p.min() >= 0.05 and p.max() <= 0.95
    edges = np.mean((p < 0.15) | (p > 0.85))
    middle = np.mean((p > 0.4) & (p < 0.6))
    assert edges > 2 * middle  # U-shaped: many low-frequency variants
    assert abs(p.mean() - 0.5) < 0.01  # symmetric


def test_balding_nichols_fst():
    rng = np.random.default_rng(1)
    ancestral = ancestral_frequencies(rng, 20_000, 0.3, 0.05)
    fst = 0.08
    p = balding_nichols(rng, ancestral, 8, fst)
    # E[var over subpopulations (ddof=1)] = F p (1 - p); the ratio of sums is precise.
    estimate = p.var(axis=0, ddof=1).sum() / (ancestral * (1 - ancestral)).sum()
    assert estimate == pytest.approx(fst, rel=0.05)


def test_admixture():
    subpopulation, ancestry = assign_ancestry(np.random.default_rng(0), 100, 4, 0.3)
    np.testing.assert_allclose(ancestry.sum(axis=1), 1.0)
    admixed = (ancestry > 0).sum(axis=1) == 2
    assert admixed.sum() == 30 and ((ancestry > 0).sum(axis=1) <= 2).all()
    np.testing.assert_array_equal(ancestry.argmax(axis=1), subpopulation)
    assert (ancestry[np.arange(100), subpopulation] >= 0.5).all()
    panel = small_panel(admixed_fraction=0.3)
    assert panel.dosages.shape == (40, 2_000)


@pytest.mark.parametrize("ld_rho", [0.0, 0.95])
def test_dosage_frequencies_match_subpopulation_frequencies(ld_rho):
    # One subpopulation: haplotypes are independent across individuals, so the allele count of
    # each marker is Binomial(2n, p) whatever the LD (the latent process is stationary N(0, 1)).
    n = 1_000
    panel = small_panel(
        n_individuals=n, n_markers=500, n_subpopulations=1, n_chromosomes=5, ld_rho=ld_rho
    )
    p = panel.population_frequency[0]
    keep = (p > 0.05) & (p < 0.95)
    z = (panel.dosages.mean(axis=0) / 2 - p)[keep] / np.sqrt(p * (1 - p) / (2 * n))[keep]
    assert np.abs(z).max() < 5
    if ld_rho == 0.0:  # independent markers: z^2 averages to 1 with SD sqrt(2 / n_markers)
        assert abs(np.mean(z**2) - 1) < 4 * np.sqrt(2 / keep.sum())


def test_linkage_disequilibrium_measurable_and_decays():
    panel = small_panel(n_individuals=100)
    x = panel.dosages.astype(float)
    chrom = panel.chromosome

    def linked_r2(distance):
        same = chrom[:-distance] == chrom[distance:]
        return r2(x[:, :-distance][:, same], x[:, distance:][:, same]).mean()

    half = x.shape[1] // 2
    other = chrom[:half] != chrom[half : 2 * half]
    unlinked = r2(x[:, :half][:, other], x[:, half : 2 * half][:, other]).mean()
    adjacent = linked_r2(1)
    assert adjacent > 4 * unlinked
    assert adjacent > linked_r2(10) > linked_r2(50)
    # Without LD, adjacent markers look like unlinked ones.
    x0 = small_panel(n_individuals=100, ld_rho=0.0).dosages.astype(float)
    same = chrom[:-1] == chrom[1:]
    assert r2(x0[:, :-1][:, same], x0[:, 1:][:, same]).mean() < 1.5 * unlinked


def test_principal_components_separate_subpopulations():
    panel = small_panel()
    mean, sd = dosage_moments(panel.dosages)
    z = standardized_product(panel.dosages, np.eye(panel.dosages.shape[1]), mean, sd)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    pcs = u[:, :3] * s[:3]  # n_subpopulations - 1 components
    labels = panel.subpopulation
    centroids = np.stack([pcs[labels == k].mean(axis=0) for k in range(4)])
    between = ((centroids[labels] - pcs.mean(axis=0)) ** 2).sum()
    assert between / ((pcs - pcs.mean(axis=0)) ** 2).sum() > 0.8
    nearest = ((pcs[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert np.mean(nearest == labels) >= 0.95


def test_standardisation():
    dosages = np.array([[0, 1, 2, 1], [2, 1, 0, 1], [1, 1, 1, 2]], dtype=np.int8)
    mean, sd = dosage_moments(dosages)
    x = dosages.astype(float)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(sd, x.std(axis=0))
    z = np.zeros_like(x)
    z[:, sd > 0] = (x[:, sd > 0] - mean[sd > 0]) / sd[sd > 0]
    weights = np.random.default_rng(0).standard_normal((4, 2))
    np.testing.assert_allclose(standardized_product(dosages, weights, mean, sd), z @ weights)
    # The monomorphic second column contributes nothing.
    weights[1] += 100.0
    np.testing.assert_allclose(standardized_product(dosages, weights, mean, sd), z @ weights)
