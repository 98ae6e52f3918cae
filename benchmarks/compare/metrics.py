"""Scores of one fit against a reference, as plain numpy functions (checked by hand-computed
values in ``tests/bench/test_compare_metrics.py``).

Intervals are 90%: equal-tailed posterior quantiles (5%, 95%) for Bayesian engines, Wald
intervals ``estimate -+ 1.645 SE`` for maximum-likelihood engines.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROBABILITY = 0.9
WALD_Z = 1.6448536269514722  # Phi^{-1}(0.95)


def bias_rmse(estimate: np.ndarray, truth: np.ndarray, axis: int = 0) -> tuple:
    """Bias ``mean(estimate - truth)`` and RMSE ``sqrt(mean((estimate - truth)^2))`` along
    ``axis`` (replicates)."""
    error = np.asarray(estimate, float) - np.asarray(truth, float)
    return error.mean(axis=axis), np.sqrt((error**2).mean(axis=axis))


def relative_rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """``sqrt(mean(((estimate - truth) / |truth|)^2))`` over scalars of different units."""
    estimate, truth = np.asarray(estimate, float), np.asarray(truth, float)
    return float(np.sqrt(np.mean(((estimate - truth) / np.abs(truth)) ** 2)))


def standardised_rmse(estimate: np.ndarray, truth: np.ndarray, scale: np.ndarray) -> float:
    """``sqrt(mean(((estimate - truth) / scale)^2))``, e.g. errors in exact-ML SEs."""
    z = (np.asarray(estimate, float) - np.asarray(truth, float)) / np.asarray(scale, float)
    return float(np.sqrt(np.mean(z**2)))


def coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> float:
    """Share of ``truth`` inside ``[lower, upper]`` (NaN bounds count as not covered)."""
    lower, upper, truth = (np.asarray(x, float) for x in (lower, upper, truth))
    return float(np.mean((lower <= truth) & (truth <= upper)))


def wald_interval(estimate: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """90% Wald interval."""
    estimate, se = np.asarray(estimate, float), np.asarray(se, float)
    return estimate - WALD_Z * se, estimate + WALD_Z * se


def mean_correlation(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over columns (curve parameters) of the Pearson correlation ``[N, K]`` vs ``[N, K]``."""
    predicted, truth = np.atleast_2d(predicted), np.atleast_2d(truth)
    columns = [np.corrcoef(predicted[:, k], truth[:, k])[0, 1] for k in range(truth.shape[1])]
    return float(np.mean(columns))


def draw_summary(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Posterior mean, SD and 90% equal-tailed interval of draws ``[n_draws, ...]``."""
    draws = np.asarray(draws, float)
    low, high = np.quantile(draws, [(1 - PROBABILITY) / 2, (1 + PROBABILITY) / 2], axis=0)
    return {"estimate": draws.mean(0), "sd": draws.std(0, ddof=1), "lower": low, "upper": high}


def nuts_agreement(summary: pd.DataFrame, reference: pd.DataFrame) -> dict[str, float]:
    """Agreement of a fit with a NUTS fit of the same data, over the labels both have.

    ``z = (estimate - estimate_nuts) / sd_nuts`` and ``ratio = sd / sd_nuts`` per scalar.

    :param summary: columns ``label, estimate, sd`` (``sd``: posterior SD or SE).
    :param reference: the NUTS fit's, same columns.
    :returns: ``nuts_mean_abs_z``, ``nuts_max_abs_z``, ``nuts_median_sd_ratio`` and
        ``nuts_scalars`` (how many labels were compared).
    """
    joined = summary.merge(reference, on="label", suffixes=("", "_nuts"))
    if joined.empty:
        return {}
    z = (joined["estimate"] - joined["estimate_nuts"]) / joined["sd_nuts"]
    ratio = joined["sd"] / joined["sd_nuts"]
    return {
        "nuts_scalars": int(len(joined)),
        "nuts_mean_abs_z": float(np.abs(z).mean()),
        "nuts_max_abs_z": float(np.abs(z).max()),
        "nuts_median_sd_ratio": float(ratio.median()),
    }
