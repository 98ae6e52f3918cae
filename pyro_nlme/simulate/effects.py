"""Marker effects of the sparse-QTL mode (``DesignConfig.sparse_qtl``): a few QTL of equal
magnitude carrying an exact share of the genetic variance, over an uncorrelated polygenic
background. The default (polygenic) mode is
:func:`pyro_nlme.simulate.phenotypes.simulate_marker_effects`."""

from __future__ import annotations

import numpy as np

from pyro_nlme.simulate.genotypes import standardized_product
from pyro_nlme.simulate.phenotypes import select_qtl

__all__ = ["simulate_sparse_marker_effects"]


def simulate_sparse_marker_effects(
    rng: np.random.Generator,
    dosages: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    genetic_sd: np.ndarray,
    *,
    n_qtl: int,
    n_shared_qtl: int,
    qtl_variance_share: float,
    qtl_min_maf: float,
) -> dict[str, np.ndarray]:
    """Sparse-QTL marker effects whose genetic values have exactly the requested variance and
    QTL share.

    Per parameter ``k``: the QTL (:func:`~pyro_nlme.simulate.phenotypes.select_qtl`, minor
    allele frequency at least ``qtl_min_maf``) get effects ``+1`` or ``-1`` (random signs), so
    each carries about ``qtl_variance_share / n_qtl`` of the genetic variance (not exactly: QTL
    in LD or in different subpopulations covary). A polygenic background (``N(0, 1)`` on every
    marker) is made uncorrelated with the QTL genetic values over all individuals, by
    subtracting its regression on them (``beta_bg -= c * beta_qtl``), so that the two variances
    add up; the two parts are then scaled to ``qtl_variance_share * genetic_sd[k] ** 2`` and
    ``(1 - qtl_variance_share) * genetic_sd[k] ** 2`` (``ddof = 0``). With
    ``qtl_variance_share = 1`` the background is 0: only the QTL have effects.

    :param rng: random generator.
    :param dosages: int8 ``[n_individuals, n_markers]``.
    :param mean: dosage column means ``[n_markers]``.
    :param sd: dosage column SDs ``[n_markers]`` (``ddof = 0``).
    :param genetic_sd: target genetic SD per parameter ``[n_parameters]``.
    :param n_qtl: QTL per parameter (> 0).
    :param n_shared_qtl: QTL shared by all parameters.
    :param qtl_variance_share: share of the genetic variance carried by the QTL, in ``(0, 1]``.
    :param qtl_min_maf: minimum minor allele frequency of a QTL.
    :returns: as :func:`~pyro_nlme.simulate.phenotypes.simulate_marker_effects`:
        ``marker_effect`` and ``qtl`` ``[n_markers, n_parameters]``, ``genetic_value`` and
        ``qtl_genetic_value`` ``[n_individuals, n_parameters]``.
    :raises ValueError: if ``n_qtl`` is 0 or ``qtl_variance_share`` is not in ``(0, 1]``.
    """
    if n_qtl < 1 or not 0.0 < qtl_variance_share <= 1.0:
        raise ValueError(
            f"the sparse-QTL mode needs n_qtl >= 1 and 0 < qtl_variance_share <= 1, got "
            f"n_qtl={n_qtl}, qtl_variance_share={qtl_variance_share}"
        )
    n_markers = dosages.shape[1]
    n_parameters = genetic_sd.size
    frequency = mean / 2.0
    eligible = (np.minimum(frequency, 1.0 - frequency) >= qtl_min_maf) & (sd > 0)
    qtl = select_qtl(rng, eligible, n_parameters, n_qtl, n_shared_qtl)
    signs = rng.choice([-1.0, 1.0], size=(n_markers, n_parameters))
    qtl_effect = np.where(qtl, signs, 0.0)
    background = rng.standard_normal((n_markers, n_parameters))
    qtl_value = standardized_product(dosages, qtl_effect, mean, sd)
    background_value = standardized_product(dosages, background, mean, sd)
    # regression of the background genetic values on the QTL ones (both have mean 0)
    slope = (background_value * qtl_value).mean(0) / qtl_value.var(0)
    background = background - slope * qtl_effect
    background_value = background_value - slope * qtl_value
    variance = genetic_sd**2
    qtl_factor = np.sqrt(qtl_variance_share * variance / qtl_value.var(0))
    background_factor = np.sqrt((1.0 - qtl_variance_share) * variance / background_value.var(0))
    qtl_effect = qtl_effect * qtl_factor
    marker_effect = background * background_factor + qtl_effect
    return {
        "marker_effect": marker_effect,
        "qtl": qtl,
        "genetic_value": standardized_product(dosages, marker_effect, mean, sd),
        "qtl_genetic_value": standardized_product(dosages, qtl_effect, mean, sd),
    }
