"""Phenotypes with the generative structure of the reference model ``g2was``.

Each plant has three curve parameters on an unconstrained scale, in this order:
``log_asymptote`` (log g), ``log_rate`` (log 1/day) and ``inflection`` (day). For variety ``v``,
scenario ``s``, replicate plant ``p`` and parameter ``k``::

    phi[v, s, p, k] = scenario_mean[s, k] + genetic_value[v, k]
                      + variety_scenario_effect[v, s, k] + plant_effect[v, s, p, k]

    genetic_value = Z @ marker_effect

with ``Z`` the standardised dosages. The biomass curve is logistic,
``asymptote * sigmoid(rate * (time - inflection))`` with ``asymptote = exp(phi[0])``,
``rate = exp(phi[1])`` and ``inflection = phi[2]``, and each image observes it with multiplicative
log-normal noise (or, through :func:`observe_trait`, as a count, a binary or binomial trait, an
ordinal score or a censored value); images are missing completely at random.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from pyro_nlme.simulate.genotypes import standardized_product

__all__ = [
    "CURVE_PARAMETERS",
    "SCENARIOS",
    "SCENARIO_CODES",
    "TRAITS",
    "logistic_curve",
    "observe",
    "observe_trait",
    "select_qtl",
    "simulate_individual_parameters",
    "simulate_marker_effects",
    "trait_prediction",
]

#: Names of the curve parameters, in the order of the last axis of ``phi``.
CURVE_PARAMETERS = ("log_asymptote", "log_rate", "inflection")
#: Watering scenarios, in order.
SCENARIOS = ("well_watered", "moderate_deficit", "severe_deficit")
#: Short codes of the scenarios used in plant identifiers (``V0001-WW-1``).
SCENARIO_CODES = ("WW", "MD", "SD")


def logistic_curve(phi: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Logistic biomass curve of unconstrained curve parameters.

    :param phi: curve parameters ``[..., 3]`` (``log_asymptote`` in log g, ``log_rate`` in
        log 1/day, ``inflection`` in day).
    :param time: times in days ``[n_times]``.
    :returns: biomass in g, ``[..., n_times]``: ``exp(phi[..., 0]) * expit(exp(phi[..., 1]) *
        (time - phi[..., 2]))`` (``expit`` is the numerically stable logistic sigmoid).
    """
    asymptote = np.exp(phi[..., 0:1])
    rate = np.exp(phi[..., 1:2])
    inflection = phi[..., 2:3]
    return asymptote * expit(rate * (time - inflection))


def select_qtl(
    rng: np.random.Generator,
    eligible: np.ndarray,
    n_parameters: int,
    n_qtl: int,
    n_shared_qtl: int,
) -> np.ndarray:
    """Choose the large-effect QTL of each curve parameter.

    ``n_shared_qtl`` markers are QTL of every parameter (pleiotropic); each parameter has
    ``n_qtl - n_shared_qtl`` further QTL of its own. All are distinct markers drawn among the
    eligible ones.

    :param rng: random generator.
    :param eligible: boolean mask of the markers that may be QTL, ``[n_markers]``.
    :param n_parameters: number of curve parameters.
    :param n_qtl: QTL per parameter.
    :param n_shared_qtl: QTL shared by all parameters, ``<= n_qtl``.
    :returns: boolean QTL indicator ``[n_markers, n_parameters]``.
    :raises ValueError: when there are fewer eligible markers than distinct QTL.
    """
    n_own = n_qtl - n_shared_qtl
    n_distinct = n_shared_qtl + n_parameters * n_own
    candidates = np.flatnonzero(eligible)
    if candidates.size < n_distinct:
        raise ValueError(f"{n_distinct} distinct QTL requested, {candidates.size} markers eligible")
    chosen = rng.choice(candidates, size=n_distinct, replace=False)
    qtl = np.zeros((eligible.size, n_parameters), dtype=bool)
    qtl[chosen[:n_shared_qtl], :] = True
    for k in range(n_parameters):
        start = n_shared_qtl + k * n_own
        qtl[chosen[start : start + n_own], k] = True
    return qtl


def simulate_marker_effects(
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
    """Draw marker effects whose genetic values have the requested variance.

    Per parameter ``k``: a polygenic background (``N(0, 1)`` effects on every marker) and
    ``N(0, 1)`` effects of the QTL (:func:`select_qtl`, among markers with minor allele frequency
    at least ``qtl_min_maf``) are scaled so that the genetic values they give have variances
    ``(1 - qtl_variance_share) * genetic_sd[k]**2`` and ``qtl_variance_share * genetic_sd[k]**2``;
    their sum is then rescaled so that the variance of ``genetic_value[:, k]`` (over all
    individuals, ``ddof=0``) is exactly ``genetic_sd[k]**2``. Genetic values have mean 0 because
    the standardised dosages do.

    :param rng: random generator.
    :param dosages: int8 ``[n_individuals, n_markers]``.
    :param mean: dosage column means ``[n_markers]``.
    :param sd: dosage column standard deviations ``[n_markers]`` (``ddof=0``).
    :param genetic_sd: target genetic standard deviation per parameter ``[n_parameters]``.
    :param n_qtl: QTL per parameter.
    :param n_shared_qtl: QTL shared by all parameters.
    :param qtl_variance_share: share of the genetic variance due to QTL before the final
        rescaling, in ``[0, 1]``; must be 0 when ``n_qtl == 0``.
    :param qtl_min_maf: minimum minor allele frequency of a QTL.
    :returns: ``marker_effect`` ``[n_markers, n_parameters]`` (per standardised dosage unit),
        ``qtl`` bool ``[n_markers, n_parameters]``, ``genetic_value`` and ``qtl_genetic_value``
        (the part due to the QTL effects) ``[n_individuals, n_parameters]``.
    """
    n_markers = dosages.shape[1]
    n_parameters = genetic_sd.size
    frequency = mean / 2.0
    eligible = (np.minimum(frequency, 1.0 - frequency) >= qtl_min_maf) & (sd > 0)
    qtl = select_qtl(rng, eligible, n_parameters, n_qtl, n_shared_qtl)
    background = rng.standard_normal((n_markers, n_parameters))
    qtl_effect = np.where(qtl, rng.standard_normal((n_markers, n_parameters)), 0.0)
    variance = genetic_sd**2

    def scaled(effect: np.ndarray, target: np.ndarray) -> np.ndarray:
        value = standardized_product(dosages, effect, mean, sd)
        realised = value.var(axis=0)
        return effect * np.sqrt(
            np.divide(target, realised, out=np.zeros_like(target), where=realised > 0)
        )

    background = scaled(background, (1.0 - qtl_variance_share) * variance)
    qtl_effect = scaled(qtl_effect, qtl_variance_share * variance)
    total = standardized_product(dosages, background + qtl_effect, mean, sd)
    realised = total.var(axis=0)
    factor = np.sqrt(np.divide(variance, realised, out=np.zeros_like(variance), where=realised > 0))
    marker_effect = (background + qtl_effect) * factor
    qtl_effect = qtl_effect * factor
    return {
        "marker_effect": marker_effect,
        "qtl": qtl,
        "genetic_value": standardized_product(dosages, marker_effect, mean, sd),
        "qtl_genetic_value": standardized_product(dosages, qtl_effect, mean, sd),
    }


def simulate_individual_parameters(
    rng: np.random.Generator,
    genetic_value: np.ndarray,
    scenario_mean: np.ndarray,
    variety_scenario_sd: np.ndarray,
    plant_sd: np.ndarray,
    n_plants: int,
) -> dict[str, np.ndarray]:
    """Add scenario means, G x E effects and plant effects to genetic values.

    :param rng: random generator.
    :param genetic_value: ``[n_varieties, n_parameters]``.
    :param scenario_mean: ``[n_scenarios, n_parameters]``.
    :param variety_scenario_sd: SD of the independent Gaussian variety x scenario effects,
        ``[n_parameters]``.
    :param plant_sd: SD of the independent Gaussian plant effects, ``[n_parameters]``.
    :param n_plants: replicate plants per variety x scenario.
    :returns: ``variety_scenario_effect`` ``[n_varieties, n_scenarios, n_parameters]``,
        ``plant_effect`` and ``individual_parameter`` (``phi``)
        ``[n_varieties, n_scenarios, n_plants, n_parameters]``.
    """
    n_varieties, n_parameters = genetic_value.shape
    n_scenarios = scenario_mean.shape[0]
    variety_scenario_effect = variety_scenario_sd * rng.standard_normal(
        (n_varieties, n_scenarios, n_parameters)
    )
    plant_effect = plant_sd * rng.standard_normal(
        (n_varieties, n_scenarios, n_plants, n_parameters)
    )
    phi = (
        scenario_mean[None, :, None, :]
        + genetic_value[:, None, None, :]
        + variety_scenario_effect[:, :, None, :]
        + plant_effect
    )
    return {
        "variety_scenario_effect": variety_scenario_effect,
        "plant_effect": plant_effect,
        "individual_parameter": phi,
    }


def observe(
    rng: np.random.Generator, curve: np.ndarray, noise_sd: float, missing_rate: float
) -> np.ndarray:
    """Observe curves with multiplicative log-normal noise and images missing at random.

    :param rng: random generator.
    :param curve: noise-free biomass in g, any shape.
    :param noise_sd: SD of the noise on the log scale: ``value = curve * exp(noise_sd * eps)``,
        ``eps ~ N(0, 1)``.
    :param missing_rate: probability that an image is missing (independently), ``value = NaN``.
    :returns: observed biomass in g with NaN for missing images, same shape as ``curve``.
    """
    value = curve * np.exp(noise_sd * rng.standard_normal(curve.shape))
    value[rng.random(curve.shape) < missing_rate] = np.nan
    return value


#: Trait types the simulator can record from the biomass curves (``DesignConfig.trait``).
TRAITS = ("biomass", "count", "binary", "binomial", "ordinal", "censored")


def trait_prediction(curve: np.ndarray, trait: str, per_gram: float) -> np.ndarray:
    """The curve a trait's observation model sees: the biomass curve itself for ``biomass``
    and ``censored``, else ``per_gram * curve`` (the mean count, the cumulative hazard, or the
    ordinal linear predictor), so that a logistic model fits it with ``log_asymptote`` shifted
    by ``log(per_gram)``.

    :param curve: noise-free biomass in g, any shape.
    """
    return curve if trait in ("biomass", "censored") else per_gram * curve


def observe_trait(
    rng: np.random.Generator,
    curve: np.ndarray,
    trait: str,
    *,
    noise_sd: float,
    missing_rate: float,
    per_gram: float,
    count_overdispersion: float,
    n_trials: int,
    cutpoints: tuple[float, ...],
    detection_limit: float,
) -> dict[str, np.ndarray]:
    """Record a trait of the given type from the biomass curves; each matches an observation
    model of :mod:`pyro_nlme.model.observations` with ``f = trait_prediction(curve)``:

    - ``biomass``: :func:`observe` (``lognormal``), the default; same draws as before traits.
    - ``count`` (e.g. leaf number): ``NegativeBinomial`` with mean ``f`` and variance
      ``f + count_overdispersion * f**2`` (``negative_binomial``; ``poisson`` when 0).
    - ``binary`` (e.g. an organ present): ``Bernoulli(1 - exp(-f))`` (``bernoulli``).
    - ``binomial``: ``Binomial(n_trials, 1 - exp(-f))`` (``binomial``), with a ``trials``
      column.
    - ``ordinal`` (e.g. a visual score): ``P(y <= k) = sigmoid(cutpoints[k] - f)``, scores
      ``0 .. len(cutpoints)`` (``ordinal:C``, ``C = len(cutpoints) + 1``).
    - ``censored``: biomass as ``biomass``, values below ``detection_limit`` recorded as the
      limit with ``cens = 1`` (left-censored, Monolix convention; ``lognormal``).

    Images are missing at random with probability ``missing_rate`` (value NaN, ``cens`` 0).

    :param curve: noise-free biomass in g, ``[..., n_times]``.
    :returns: ``value`` (float, NaN where missing) and, for ``censored``, ``cens`` (int) or,
        for ``binomial``, ``trials`` (int), each of the curve's shape.
    :raises ValueError: on an unknown trait.
    """
    if trait not in TRAITS:
        raise ValueError(f"unknown trait {trait!r}; choose one of {TRAITS}")
    if trait in ("biomass", "censored"):
        value = observe(rng, curve, noise_sd, missing_rate)
        if trait == "biomass":
            return {"value": value}
        below = value < detection_limit
        return {"value": np.where(below, detection_limit, value), "cens": below.astype(np.int64)}
    f = trait_prediction(curve, trait, per_gram)
    columns = {}
    if trait == "count":
        if count_overdispersion > 0:
            size = 1.0 / count_overdispersion
            value = rng.negative_binomial(size, size / (size + f)).astype(float)
        else:
            value = rng.poisson(f).astype(float)
    elif trait == "binary":
        value = (rng.random(f.shape) < -np.expm1(-f)).astype(float)
    elif trait == "binomial":
        value = rng.binomial(n_trials, -np.expm1(-f)).astype(float)
        columns["trials"] = np.full(f.shape, n_trials, dtype=np.int64)
    else:
        latent = f + rng.logistic(size=f.shape)
        value = (latent[..., None] > np.asarray(cutpoints)).sum(-1).astype(float)
    value[rng.random(f.shape) < missing_rate] = np.nan
    return {"value": value, **columns}
