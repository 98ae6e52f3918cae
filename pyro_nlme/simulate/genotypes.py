"""Cheap genotype generator with population structure and linkage disequilibrium.

The generator is a documented approximation, not a coalescent simulation. It reproduces the
two features of real marker panels that matter to genomic models: population structure (allele
frequencies that differ between subpopulations) and linkage disequilibrium (correlation between
nearby markers that decays with distance and vanishes between chromosomes).

1. **Ancestral allele frequencies** ``p[m]`` follow a U-shaped ``Beta(a, a)`` distribution
   (``a = allele_frequency_shape``, e.g. 0.3), truncated to ``[min_maf, 1 - min_maf]`` by inverse
   transform sampling (no probability spike at the floor), so that there are many low-frequency
   variants but few monomorphic markers.
2. **Subpopulation frequencies** follow the Balding-Nichols model:
   ``p[s, m] ~ Beta(p[m] (1 - F) / F, (1 - p[m]) (1 - F) / F)`` with ``F = fst``.
3. **Ancestry**: varieties are split evenly between subpopulations at random; a fraction
   ``admixed_fraction`` of them is admixed between their own subpopulation and one other, with a
   share of their own subpopulation drawn uniformly in ``[0.5, 1]``. The allele frequency of
   variety ``i`` is ``q[i] @ p[:, m]`` (the admixture model of STRUCTURE/ADMIXTURE).
4. **Haplotypes**: each of the two haplotypes of a variety carries a latent stationary Gaussian
   AR(1) process along each chromosome, ``z[m] = rho z[m-1] + sqrt(1 - rho^2) e[m]``, restarted
   at each chromosome (``rho = ld_rho``). The haplotype carries the counted allele at marker
   ``m`` when ``z[m] > Phi^{-1}(1 - q[i] @ p[:, m])``, i.e. with probability equal to its allele
   frequency. Thresholding a correlated latent process makes alleles of nearby markers
   correlated (LD decaying geometrically with the distance in markers); independent chromosomes
   give unlinked markers. The dosage is the sum of the two haplotypes (0, 1 or 2).

Markers are spread evenly over chromosomes (the remainder goes to the first chromosomes) and
identified by chromosome and rank of position, ``chr01_000001``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter
from scipy.special import betainc, betaincinv, ndtri

__all__ = [
    "Genotypes",
    "ancestral_frequencies",
    "assign_ancestry",
    "balding_nichols",
    "dosage_moments",
    "marker_layout",
    "simulate_dosages",
    "simulate_genotypes",
    "standardized_product",
]

#: Number of markers converted to float at a time when multiplying dosages by effects.
_CHUNK = 8192


@dataclass(frozen=True)
class Genotypes:
    """A simulated marker panel and the quantities that generated it.

    :ivar dosages: allele dosages (count of the counted allele, 0/1/2), int8
        ``[n_individuals, n_markers]``.
    :ivar marker_ids: marker identifiers ``chrCC_RRRRRR`` (chromosome, 1-based position rank).
    :ivar chromosome: 1-based chromosome of each marker, int64 ``[n_markers]``.
    :ivar position: 1-based position rank of each marker within its chromosome, int64
        ``[n_markers]``.
    :ivar ancestral_frequency: ancestral frequency of the counted allele, ``[n_markers]``.
    :ivar population_frequency: subpopulation frequencies of the counted allele,
        ``[n_subpopulations, n_markers]``.
    :ivar subpopulation: 0-based main subpopulation of each individual, int64
        ``[n_individuals]``.
    :ivar ancestry: ancestry proportions, rows sum to 1, ``[n_individuals, n_subpopulations]``.
    """

    dosages: np.ndarray
    marker_ids: list[str]
    chromosome: np.ndarray
    position: np.ndarray
    ancestral_frequency: np.ndarray
    population_frequency: np.ndarray
    subpopulation: np.ndarray
    ancestry: np.ndarray


def marker_layout(n_markers: int, n_chromosomes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Spread markers evenly over chromosomes and name them.

    :param n_markers: number of markers (at least ``n_chromosomes``).
    :param n_chromosomes: number of chromosomes (at most 99).
    :returns: ``(chromosome, position, marker_ids)``: 1-based chromosome and 1-based position
        rank within the chromosome (int64 ``[n_markers]``, sorted by chromosome then position),
        and the identifiers ``chr01_000001``, ... (rank zero-padded to at least 6 digits).
    """
    if not 1 <= n_chromosomes <= min(99, n_markers):
        raise ValueError(f"need 1 <= n_chromosomes <= min(99, n_markers), got {n_chromosomes}")
    sizes = np.full(n_chromosomes, n_markers // n_chromosomes)
    sizes[: n_markers % n_chromosomes] += 1
    chromosome = np.repeat(np.arange(1, n_chromosomes + 1), sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    position = np.arange(n_markers) - starts + 1
    width = max(6, len(str(int(sizes[0]))))
    marker_ids = [f"chr{c:02d}_{r:0{width}d}" for c, r in zip(chromosome, position, strict=True)]
    return chromosome, position, marker_ids


def ancestral_frequencies(
    rng: np.random.Generator, n_markers: int, shape: float, min_maf: float
) -> np.ndarray:
    """Draw ancestral allele frequencies from a truncated U-shaped Beta distribution.

    :param rng: random generator.
    :param n_markers: number of markers.
    :param shape: both shape parameters ``a`` of ``Beta(a, a)``; ``a < 1`` is U-shaped.
    :param min_maf: truncation: frequencies lie in ``[min_maf, 1 - min_maf]``, ``0 <= min_maf <
        0.5``.
    :returns: frequencies of the counted allele, float64 ``[n_markers]``.
    """
    low = betainc(shape, shape, min_maf)
    return betaincinv(shape, shape, rng.uniform(low, 1.0 - low, size=n_markers))


def balding_nichols(
    rng: np.random.Generator, ancestral: np.ndarray, n_subpopulations: int, fst: float
) -> np.ndarray:
    """Draw subpopulation allele frequencies by the Balding-Nichols model.

    :param rng: random generator.
    :param ancestral: ancestral frequencies in ``(0, 1)``, ``[n_markers]``.
    :param n_subpopulations: number of subpopulations.
    :param fst: fixation index ``F`` in ``(0, 1)``; the subpopulation frequencies have mean
        ``p`` and variance ``F p (1 - p)``.
    :returns: frequencies, float64 ``[n_subpopulations, n_markers]``.
    """
    concentration = (1.0 - fst) / fst
    size = (n_subpopulations, ancestral.size)
    return rng.beta(ancestral * concentration, (1.0 - ancestral) * concentration, size=size)


def assign_ancestry(
    rng: np.random.Generator, n_individuals: int, n_subpopulations: int, admixed_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Assign individuals to subpopulations (balanced sizes) and optionally admix some.

    :param rng: random generator.
    :param n_individuals: number of individuals.
    :param n_subpopulations: number of subpopulations.
    :param admixed_fraction: fraction of individuals (rounded) admixed between their own
        subpopulation (share uniform in ``[0.5, 1]``) and another one drawn at random; needs
        ``n_subpopulations >= 2`` when positive.
    :returns: ``(subpopulation, ancestry)``: 0-based main subpopulation, int64
        ``[n_individuals]`` (the one with the largest share), and ancestry proportions
        ``[n_individuals, n_subpopulations]``.
    """
    subpopulation = rng.permutation(np.arange(n_individuals) % n_subpopulations)
    ancestry = np.zeros((n_individuals, n_subpopulations))
    ancestry[np.arange(n_individuals), subpopulation] = 1.0
    n_admixed = round(admixed_fraction * n_individuals)
    if n_admixed:
        admixed = rng.choice(n_individuals, size=n_admixed, replace=False)
        offset = rng.integers(1, n_subpopulations, size=n_admixed)
        other = (subpopulation[admixed] + offset) % n_subpopulations
        own_share = rng.uniform(0.5, 1.0, size=n_admixed)
        ancestry[admixed, subpopulation[admixed]] = own_share
        ancestry[admixed, other] = 1.0 - own_share
    return subpopulation, ancestry


def simulate_dosages(
    rng: np.random.Generator,
    ancestry: np.ndarray,
    population_frequency: np.ndarray,
    chromosome: np.ndarray,
    ld_rho: float,
) -> np.ndarray:
    """Draw dosages from thresholded latent AR(1) haplotypes, one chromosome at a time.

    :param rng: random generator.
    :param ancestry: ancestry proportions ``[n_individuals, n_subpopulations]``.
    :param population_frequency: subpopulation allele frequencies
        ``[n_subpopulations, n_markers]``.
    :param chromosome: chromosome of each marker, markers of a chromosome contiguous,
        ``[n_markers]``.
    :param ld_rho: correlation of the latent process between adjacent markers, in ``[0, 1)``.
    :returns: dosages 0/1/2, int8 ``[n_individuals, n_markers]``.
    """
    n_individuals = ancestry.shape[0]
    n_markers = population_frequency.shape[1]
    # Individuals share thresholds when they share ancestry: without admixture only
    # n_subpopulations rows of inverse normal CDFs are computed.
    profiles, profile_of = np.unique(ancestry, axis=0, return_inverse=True)
    thresholds = ndtri(1.0 - profiles @ population_frequency).astype(np.float32)
    innovation_sd = np.float32(np.sqrt(1.0 - ld_rho**2))
    numerator = np.array([innovation_sd], dtype=np.float32)
    denominator = np.array([1.0, -ld_rho], dtype=np.float32)
    _, starts = np.unique(chromosome, return_index=True)
    bounds = [*np.sort(starts).tolist(), n_markers]
    dosages = np.empty((n_individuals, n_markers), dtype=np.int8)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        noise = rng.standard_normal((2, n_individuals, stop - start), dtype=np.float32)
        noise[..., 0] /= innovation_sd  # start each chromosome in the stationary N(0, 1)
        latent = lfilter(numerator, denominator, noise, axis=-1)
        threshold = thresholds[profile_of, start:stop]
        np.add(
            latent[0] > threshold, latent[1] > threshold, out=dosages[:, start:stop], dtype=np.int8
        )
    return dosages


def simulate_genotypes(
    rng: np.random.Generator,
    n_individuals: int,
    n_markers: int,
    *,
    n_chromosomes: int,
    n_subpopulations: int,
    fst: float,
    allele_frequency_shape: float,
    min_maf: float,
    ld_rho: float,
    admixed_fraction: float,
) -> Genotypes:
    """Simulate a structured marker panel with linkage disequilibrium (see the module docstring).

    :param rng: random generator (consumed in a fixed order, so a seed fixes the result).
    :param n_individuals: number of individuals (varieties).
    :param n_markers: number of markers.
    :param n_chromosomes: number of chromosomes.
    :param n_subpopulations: number of subpopulations.
    :param fst: Balding-Nichols fixation index, in ``(0, 1)``.
    :param allele_frequency_shape: shape ``a`` of the ancestral ``Beta(a, a)``.
    :param min_maf: floor of the ancestral minor allele frequency, in ``[0, 0.5)``.
    :param ld_rho: latent correlation between adjacent markers, in ``[0, 1)``.
    :param admixed_fraction: fraction of admixed individuals, in ``[0, 1]``.
    :returns: the panel and its generating quantities.
    """
    chromosome, position, marker_ids = marker_layout(n_markers, n_chromosomes)
    ancestral = ancestral_frequencies(rng, n_markers, allele_frequency_shape, min_maf)
    population_frequency = balding_nichols(rng, ancestral, n_subpopulations, fst)
    subpopulation, ancestry = assign_ancestry(
        rng, n_individuals, n_subpopulations, admixed_fraction
    )
    dosages = simulate_dosages(rng, ancestry, population_frequency, chromosome, ld_rho)
    return Genotypes(
        dosages=dosages,
        marker_ids=marker_ids,
        chromosome=chromosome,
        position=position,
        ancestral_frequency=ancestral,
        population_frequency=population_frequency,
        subpopulation=subpopulation,
        ancestry=ancestry,
    )


def dosage_moments(dosages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (``ddof=0``) of a dosage matrix.

    :param dosages: int8 ``[n_individuals, n_markers]``.
    :returns: ``(mean, sd)``, float64 ``[n_markers]``; ``sd`` is 0 for monomorphic markers.
    """
    counts = np.stack([(dosages == value).sum(axis=0) for value in (1, 2)])
    n = dosages.shape[0]
    mean = (counts[0] + 2.0 * counts[1]) / n
    second_moment = (counts[0] + 4.0 * counts[1]) / n
    return mean, np.sqrt(np.maximum(second_moment - mean**2, 0.0))


def standardized_product(
    dosages: np.ndarray, weights: np.ndarray, mean: np.ndarray, sd: np.ndarray
) -> np.ndarray:
    """Multiply standardised dosages by weights without a float copy of the whole matrix.

    Computes ``Z @ weights`` with ``Z[:, m] = (dosages[:, m] - mean[m]) / sd[m]`` and
    ``Z[:, m] = 0`` where ``sd[m] == 0`` (monomorphic markers), converting
    ``8192`` markers at a time to float64.

    :param dosages: int8 ``[n_individuals, n_markers]``.
    :param weights: ``[n_markers, k]``.
    :param mean: column means ``[n_markers]``.
    :param sd: column standard deviations ``[n_markers]``.
    :returns: float64 ``[n_individuals, k]``.
    """
    polymorphic = sd > 0
    scaled = np.where(polymorphic[:, None], weights, 0.0) / np.where(polymorphic, sd, 1.0)[:, None]
    product = -(mean @ scaled)[None, :].repeat(dosages.shape[0], axis=0)
    for start in range(0, dosages.shape[1], _CHUNK):
        block = slice(start, start + _CHUNK)
        product += dosages[:, block].astype(np.float64) @ scaled[block]
    return product
