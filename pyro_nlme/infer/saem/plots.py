"""The convergence plot of SAEM and MCEM, as saemix's ``plot(fit, plot.type = "convergence")``:
one panel per population parameter against the iteration, the end of the first phase marked."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def plot_convergence(
    history: pd.DataFrame, path: str | Path | None = None, burn_in: int | None = None
):
    """Plot each column of ``history`` (``FitResult.history``) against the iteration.

    :param path: where to save the figure (any format matplotlib knows), or None.
    :param burn_in: iterations of the first phase (a vertical line), if given.
    :returns: the matplotlib figure. Needs matplotlib (the ``bench`` extra).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(history.columns)
    n_cols = min(4, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.4 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        ax.plot(history.index, history[column], lw=1)
        if burn_in is not None:
            ax.axvline(burn_in, color="grey", ls=":", lw=1)
        ax.set_title(column, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.set_visible(False)
    figure.supxlabel("iteration", fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
