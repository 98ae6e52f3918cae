"""Data of a cell, with what its estimates are scored against.

- Simulated design: the truth of the simulator (``truth.nc``): population parameters, genetic
  values of the fitted varieties, and the held-out varieties' markers and genetic values.
- Orange: the exact maximum likelihood (:func:`pyro_nlme.reference.exact_mle`), and its SEs.
- Soybean: no reference (times, log-likelihoods and agreement with NUTS only).

Population parameters are labelled ``name`` (scalar) or ``name[i]`` with ``i`` the flat
(C-order) index into the site's value, in the model's dim order (what SAEM's
``point_estimate`` group uses); every engine's estimates are flattened the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from benchmarks.compare.grid import DataSpec
from pyro_nlme.data import GenotypeMatrix, NLMEData, load_data, load_orange, load_soybean
from pyro_nlme.reference import exact_mle
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was
from pyro_nlme_models.orange import orange
from pyro_nlme_models.soybean import soybean

DESIGN_POPULATION = ("scenario_mean", "genetic_sd", "variety_scenario_sd", "plant_sd", "noise_sd")
ORANGE_POPULATION = ("asymptote", "inflection", "scale", "asymptote_sd", "noise_sd")


@dataclass
class Prepared:
    """A data set ready for the engines.

    :param data: the data.
    :param model: the Pyro model; ``model_kwargs`` its keyword arguments.
    :param population_truth: reference value of every scored population scalar, by label.
    :param population_scale: a scale per label for standardised errors (exact SEs for
        Orange), or None.
    :param genetic_truth: true genetic values ``[V, K]`` of the fitted varieties, or None.
    :param heldout_markers: the held-out varieties' genotypes, standardised with the training
        moments (``[V_new, M]``), or None; ``heldout_truth`` their genetic values ``[V_new, K]``.
    """

    data: NLMEData
    model: Callable
    model_kwargs: dict
    population_truth: dict[str, float]
    population_scale: dict[str, float] | None = None
    genetic_truth: np.ndarray | None = None
    heldout_markers: GenotypeMatrix | None = None
    heldout_truth: np.ndarray | None = None


def flat_labels(name: str, value: np.ndarray) -> dict[str, float]:
    """``{name: v}`` for a scalar, else ``{name[i]: v.ravel()[i]}``."""
    value = np.asarray(value, dtype=float)
    if value.size == 1 and value.ndim == 0:
        return {name: float(value)}
    return {f"{name}[{i}]": float(v) for i, v in enumerate(value.ravel())}


def _heldout(data: NLMEData, genotypes: pd.DataFrame) -> GenotypeMatrix:
    """Held-out genotypes standardised with the training varieties' moments."""
    dosages = torch.as_tensor(genotypes.iloc[:, 1:].to_numpy(np.int8))
    m = data.markers
    return GenotypeMatrix(dosages, m.marker_ids, m.mean, m.scale, m.monomorphic, 0)


def _design(spec: DataSpec, seed: int) -> Prepared:
    config = DesignConfig(
        n_varieties=spec.n_varieties,
        n_heldout=spec.n_heldout,
        n_markers=spec.n_markers or 200,  # the simulator draws genetic values from markers
    )
    sim = simulate_design(config, seed=seed)
    truth = sim.truth
    kwargs = {}
    heldout_markers = heldout_truth = None
    if spec.n_markers:
        heldout = truth["heldout"].values
        genotypes = sim.genotype_table()
        data = load_data(sim.phenotypes, markers=genotypes[~heldout])
        kwargs["marker_form"] = spec.marker_form
        if heldout.any():
            new = genotypes[heldout]
            heldout_markers = _heldout(data, new)
            heldout_truth = truth["genetic_value"].sel(variety=list(new["variety"])).values
    else:
        data = load_data(sim.phenotypes)
    scenarios = list(data.scenario_names)
    population = {}
    for name in DESIGN_POPULATION:
        value = truth[name]
        if "scenario" in value.dims:
            value = value.sel(scenario=scenarios)
        population.update(flat_labels(name, value.values))
    genetic = truth["genetic_value"].sel(variety=list(data.variety_ids)).values
    return Prepared(data, g2was, kwargs, population, None, genetic, heldout_markers, heldout_truth)


def _orange() -> Prepared:
    data = load_orange()
    exact = exact_mle(data)
    return Prepared(
        data,
        orange,
        {},
        {p: float(exact.estimate[p]) for p in ORANGE_POPULATION},
        {p: float(exact.standard_error[p]) for p in ORANGE_POPULATION},
    )


def prepare(spec: DataSpec, seed: int) -> Prepared:
    """The data set of a cell (simulated with ``seed`` for the design)."""
    if spec.name == "design":
        return _design(spec, seed)
    if spec.name == "orange":
        return _orange()
    return Prepared(load_soybean(), soybean, {}, {})
