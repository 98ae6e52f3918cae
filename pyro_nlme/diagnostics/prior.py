"""Prior predictive checks: does a model's prior cover the data's range?"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from pyro.infer import Predictive

from pyro_nlme.data import NLMEData
from pyro_nlme.model.convention import OBSERVED_SITE

QUANTILES = (0.05, 0.5, 0.95)


def prior_predictive_draws(
    model: Callable, data: NLMEData, num_draws: int, **model_kwargs
) -> torch.Tensor:
    """``[num_draws, V, S, P, T]`` observations simulated from the prior on the data's design."""
    predictive = Predictive(model, num_samples=num_draws, return_sites=[OBSERVED_SITE])
    draws = predictive(data.without_values(), **model_kwargs)[OBSERVED_SITE]
    return draws.reshape(num_draws, *data.mask.shape)


def prior_predictive_summary(
    model: Callable, data: NLMEData, num_draws: int = 200, **model_kwargs
) -> pd.DataFrame:
    """Per scenario and time slot: quantiles (5, 50, 95%) of the observed values and of the
    prior predictive values, and the share of observed values inside their cell's 90% prior
    predictive interval (``covered``)."""
    draws = prior_predictive_draws(model, data, num_draws, **model_kwargs).cpu().numpy()
    values = data.values.cpu().numpy()
    mask = data.mask.cpu().numpy()
    low, high = np.quantile(draws, [QUANTILES[0], QUANTILES[-1]], axis=0)
    inside = (values >= low) & (values <= high)
    rows = []
    for s, scenario in enumerate(data.scenario_names):
        for t in range(data.n_times):
            cell = mask[:, s, :, t]
            if not cell.any():
                continue
            observed = values[:, s, :, t][cell]
            simulated = draws[:, :, s, :, t][:, cell]
            rows.append(
                {
                    "scenario": scenario,
                    "time": float(np.median(data.times.cpu().numpy()[:, s, :, t][cell])),
                    **{f"observed_q{int(q * 100)}": np.quantile(observed, q) for q in QUANTILES},
                    **{f"prior_q{int(q * 100)}": np.quantile(simulated, q) for q in QUANTILES},
                    "covered": inside[:, s, :, t][cell].mean(),
                }
            )
    return pd.DataFrame(rows)
