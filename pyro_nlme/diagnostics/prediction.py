"""Tables of predicted curves."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd

from pyro_nlme.model.convention import CURVE_SITE


def curve_interval_table(idata: az.InferenceData, prob: float = 0.9) -> pd.DataFrame:
    """Posterior mean and central ``prob`` interval of the noise-free curve of the first plant
    slot (a new plant, for a prediction), one row per variety, scenario and time slot."""
    curve = idata.posterior[CURVE_SITE].isel(plant=0)
    tail = (1 - prob) / 2
    times = idata.constant_data["times"].isel(plant=0)
    table = xr_to_frame(
        mean=curve.mean(("chain", "draw")),
        low=curve.quantile(tail, ("chain", "draw")).drop_vars("quantile"),
        high=curve.quantile(1 - tail, ("chain", "draw")).drop_vars("quantile"),
        time_value=times,
    )
    return table.rename(
        columns={"low": f"q{tail * 100:g}", "high": f"q{(1 - tail) * 100:g}", "time_value": "t"}
    )


def xr_to_frame(**arrays) -> pd.DataFrame:
    """Long table of same-dimension DataArrays, one column each."""
    frames = [array.rename(name).to_dataframe()[[name]] for name, array in arrays.items()]
    table = pd.concat(frames, axis=1).reset_index()
    return table.drop(columns=[c for c in ("chain", "draw") if c in table]).astype(
        {name: np.float64 for name in arrays}
    )
