"""Manhattan-style plots of marker effects or posterior inclusion probabilities, one panel per
curve parameter, markers along the genome (chromosome by chromosome).

matplotlib is imported when a plot is drawn (it is installed with ArviZ; the library itself
never needs it otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import arviz as az
import numpy as np
import xarray as xr

from pyro_nlme.export import GUIDE_MEAN

MARKER_ID = re.compile(r"^chr(\d+)_(\d+)$")
"""Marker ids of the simulator (``chr01_000001``): chromosome and position rank."""
STATISTICS = ("pip", "effect")


def marker_statistic(idata: az.InferenceData, statistic: str = "pip") -> xr.DataArray:
    """Per-marker summary of a fit, ``[marker, curve_parameter]``.

    :param statistic: ``pip``: posterior mean of ``marker_effect_inclusion_probability`` (the
        posterior inclusion probability, spike-and-slab fits); ``effect``: absolute posterior
        mean of ``marker_effect``, the closed-form one of the ``guide_mean`` group where the
        fit has it (:data:`~pyro_nlme.export.GUIDE_MEAN`), else the mean of the draws.
    :raises ValueError: if the fit has no such variable (e.g. a PIP asked of a ridge fit).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    name = "marker_effect_inclusion_probability" if statistic == "pip" else "marker_effect"
    posterior = idata.posterior
    if name not in posterior:
        raise ValueError(
            f"the fit has no {name!r} in its posterior: "
            + (
                "posterior inclusion probabilities need marker_prior='spike_slab'"
                if statistic == "pip"
                else "it has no marker effects"
            )
        )
    if statistic == "pip":
        return posterior[name].mean(("chain", "draw"))
    if GUIDE_MEAN in idata.groups() and name in idata[GUIDE_MEAN]:
        return abs(idata[GUIDE_MEAN][name])
    return abs(posterior[name].mean(("chain", "draw")))


def genome_positions(
    marker_ids: Sequence[str],
    chromosome: np.ndarray | None = None,
    position: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chromosome and position of each marker: given, or read from ids ``chrCC_PPPPPP``,
    else one chromosome with positions in file order.

    :returns: ``(chromosome, position)``, int arrays ``[n_markers]``.
    """
    if chromosome is not None and position is not None:
        return np.asarray(chromosome), np.asarray(position)
    parsed = [MARKER_ID.match(str(m)) for m in marker_ids]
    if all(parsed):
        return (
            np.array([int(m.group(1)) for m in parsed]),
            np.array([int(m.group(2)) for m in parsed]),
        )
    return np.ones(len(marker_ids), dtype=int), np.arange(1, len(marker_ids) + 1)


def plot_manhattan(
    values: xr.DataArray,
    chromosome: np.ndarray | None = None,
    position: np.ndarray | None = None,
    highlight: np.ndarray | None = None,
    ylabel: str | None = None,
):
    """One panel per curve parameter: each marker's value at its place along the genome,
    chromosomes in alternating colours, markers of ``highlight`` (e.g. the true QTL) circled.

    :param values: ``[marker, curve_parameter]`` (:func:`marker_statistic`).
    :param chromosome: chromosome of each marker (default: from the ids,
        :func:`genome_positions`); ``position`` likewise, any increasing unit.
    :param highlight: bool ``[marker, curve_parameter]`` or ``[marker]``.
    :returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    values = values.transpose("marker", ...)
    chromosome, position = genome_positions(values["marker"].values, chromosome, position)
    order = np.lexsort((position, chromosome))
    # cumulative coordinate: chromosomes one after the other
    offsets, x = {}, np.empty(len(position), dtype=float)
    start = 0.0
    for c in np.unique(chromosome):
        on = chromosome == c
        offsets[c] = start
        x[on] = start + position[on] - position[on].min()
        start = x[on].max() + 1 + 0.02 * len(position)
    parameters = values["curve_parameter"].values if "curve_parameter" in values.dims else [None]
    figure, axes = plt.subplots(
        len(parameters), 1, figsize=(10, 2.2 * len(parameters)), sharex=True, squeeze=False
    )
    for k, (axis, parameter) in enumerate(zip(axes[:, 0], parameters, strict=True)):
        y = values.values[:, k] if parameter is not None else values.values
        colours = np.where(chromosome % 2 == 0, "tab:blue", "tab:gray")
        axis.scatter(x[order], y[order], s=3, c=colours[order], linewidths=0)
        if highlight is not None:
            mark = highlight[:, k] if np.ndim(highlight) == 2 else highlight
            axis.scatter(x[mark], y[mark], s=40, facecolors="none", edgecolors="tab:red")
        axis.set_ylabel(ylabel or str(values.name))
        if parameter is not None:
            axis.set_title(str(parameter), fontsize=9, loc="left")
    centres = [(offsets[c] + x[chromosome == c].max()) / 2 for c in np.unique(chromosome)]
    axes[-1, 0].set_xticks(centres, [str(c) for c in np.unique(chromosome)], fontsize=7)
    axes[-1, 0].set_xlabel("chromosome")
    figure.tight_layout()
    return figure
