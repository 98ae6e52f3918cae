"""Tables of population parameters from an InferenceData."""

from __future__ import annotations

from collections.abc import Sequence

import arviz as az
import pandas as pd


def posterior_table(
    idata: az.InferenceData,
    var_names: Sequence[str],
    hdi_prob: float = 0.9,
    diagnostics: bool = True,
) -> pd.DataFrame:
    """Posterior mean, SD, HDI, and (with ``diagnostics``, for MCMC) ESS and R-hat of the named
    variables, one row per scalar, as ``az.summary`` computes them. Independent draws from a
    variational guide need no convergence diagnostics: pass ``diagnostics=False``."""
    return az.summary(
        idata,
        var_names=list(var_names),
        hdi_prob=hdi_prob,
        kind="all" if diagnostics else "stats",
        round_to="none",
    )
