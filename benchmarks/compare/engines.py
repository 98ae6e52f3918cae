"""One function per engine: fit a prepared data set with a cell's settings and return a
:class:`Fit` (the estimates in one layout, whatever the engine). Our engines are called only
through their public entry points (``fit_*`` with their configs, :class:`FitResult`); the peers
are imported only when their cell runs (``bench`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from benchmarks.compare.datasets import Prepared, flat_labels
from benchmarks.compare.metrics import draw_summary, wald_interval
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.saem import MCEMConfig, SAEMConfig, fit_mcem, fit_saem
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.model.kinship import attach_marker_effects

NOT_POPULATION = ("curve", "marker_effect", "genetic_value_raw")
ELBO_WINDOW = 50


@dataclass
class Fit:
    """A fit's estimates, engine-independent.

    :param summary: one row per scalar: ``label``, ``kind`` (``population`` or ``genetic``),
        ``estimate``, ``sd`` (posterior SD or SE; NaN if the engine gives none), ``lower``,
        ``upper`` (90% interval; NaN if none). Genetic rows are ``genetic_value[v,k]``.
    :param marker_effect: posterior mean marker effects ``[M, K]`` (standardised dosages), or
        None.
    :param metrics: engine-specific numbers (``elbo``, ``minus_two_log_likelihood``,
        ``max_r_hat``, ``divergences``, ``steps``, ...).
    """

    summary: pd.DataFrame
    marker_effect: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)


def _rows(kind: str, label_values: dict[str, dict[str, float]]) -> list[dict]:
    return [{"label": label, "kind": kind, **values} for label, values in label_values.items()]


def summarise_draws(name: str, draws: np.ndarray, kind: str = "population") -> list[dict]:
    """Rows of a variable's draws ``[chain, draw, ...]`` (flat labels, :func:`flat_labels`)."""
    flat = np.asarray(draws, float).reshape(-1, *draws.shape[2:])
    stats = draw_summary(flat)
    labelled = {key: flat_labels(name, value) for key, value in stats.items()}
    labels = labelled["estimate"].keys()
    return _rows(kind, {lab: {k: labelled[k][lab] for k in labelled} for lab in labels})


def genetic_rows(genetic: np.ndarray, kind: str = "genetic") -> list[dict]:
    """Rows ``genetic_value[v,k]`` of draws ``[n, V, K]``, labelled by (variety, parameter)."""
    stats = draw_summary(genetic)
    n_varieties, n_parameters = genetic.shape[1:]
    return [
        {
            "label": f"genetic_value[{v},{k}]",
            "kind": kind,
            **{key: float(value[v, k]) for key, value in stats.items()},
        }
        for v in range(n_varieties)
        for k in range(n_parameters)
    ]


def population_names(prepared: Prepared, posterior: dict[str, np.ndarray]) -> list[str]:
    """The scored population sites: those of the reference, else every posterior variable
    without a variety dim (the caller passes only those)."""
    if prepared.population_truth:
        return list(dict.fromkeys(label.split("[")[0] for label in prepared.population_truth))
    return [n for n in posterior if n not in NOT_POPULATION]


def fit_from_posterior(
    prepared: Prepared,
    posterior: dict[str, np.ndarray],
    population: list[str],
    metrics: dict,
) -> Fit:
    """A :class:`Fit` from posterior draws ``{name: [chain, draw, ...]}`` (genetic values
    ``[chain, draw, V, K]`` under ``genetic_value``, marker effects under ``marker_effect``)."""
    rows = []
    for name in population:
        rows += summarise_draws(name, posterior[name])
    marker_effect = None
    genetic = posterior.get("genetic_value")
    if "marker_effect" in posterior and prepared.data.markers is not None:
        effects = posterior["marker_effect"]
        marker_effect = effects.mean((0, 1))
        if genetic is None:  # effects form: genetic values = Z @ marker effects, per draw
            flat = torch.as_tensor(effects.reshape(-1, *effects.shape[2:]), dtype=torch.float32)
            n, m, k = flat.shape
            product = prepared.data.markers.standardized_matmul(
                flat.permute(1, 0, 2).reshape(m, -1)
            )
            genetic = product.reshape(-1, n, k).permute(1, 0, 2).numpy()[None]
    if genetic is not None and prepared.genetic_truth is not None:
        rows += genetic_rows(genetic.reshape(-1, *genetic.shape[2:]))
    return Fit(pd.DataFrame(rows), marker_effect, metrics)


def _posterior(result: FitResult, prepared: Prepared) -> dict[str, np.ndarray]:
    idata = result.inference_data
    data = prepared.data
    if (
        data.markers is not None
        and "genetic_value" in idata.posterior
        and "marker_effect" not in idata.posterior
    ):
        attach_marker_effects(idata, data.markers)
    posterior = idata.posterior
    return {
        name: posterior[name].values
        for name in posterior.data_vars
        if "variety" not in posterior[name].dims or name == "genetic_value"
    }


def _population_of(posterior: dict[str, np.ndarray]) -> list[str]:
    return [n for n in posterior if n not in NOT_POPULATION and n != "genetic_value"]


# -- our engines --------------------------------------------------------------------------


def run_svi(prepared: Prepared, guide: str, seed: int, options: dict) -> Fit:
    config = SVIConfig(guide=guide, seed=seed, progress=False, **options)
    result = fit_svi(prepared.model, prepared.data, config, model_kwargs=prepared.model_kwargs)
    losses = result.history["loss"].to_numpy()
    metrics = {
        "elbo": float(-losses[-ELBO_WINDOW:].mean()),
        "steps": int(len(losses)),
        "engine_warnings": len(result.warnings),
    }
    posterior = _posterior(result, prepared)
    names = population_names(prepared, {n: posterior[n] for n in _population_of(posterior)})
    return fit_from_posterior(prepared, posterior, names, metrics)


def run_nuts(prepared: Prepared, seed: int, options: dict) -> Fit:
    config = NUTSConfig(seed=seed, progress=False, **options)
    result = fit_nuts(prepared.model, prepared.data, config, model_kwargs=prepared.model_kwargs)
    stats = result.inference_data.sample_stats
    metrics = {
        "max_r_hat": float(result.population_summary["r_hat"].max()),
        "min_ess_bulk": float(result.population_summary["ess_bulk"].min()),
        "divergences": int(stats["diverging"].sum()),
    }
    posterior = _posterior(result, prepared)
    names = population_names(prepared, {n: posterior[n] for n in _population_of(posterior)})
    return fit_from_posterior(prepared, posterior, names, metrics)


def flat_point_labels(labels: list[str]) -> list[str]:
    """Our flat labels (:func:`flat_labels`) for a point-estimate table's rows, whatever its
    own label format (``scenario_mean[0]``, ``scenario_mean[0,log_rate]``, ...): rows of one
    site come together, in the C order of its value, so ``name[i]`` is the ``i``-th row of
    ``name`` (a site with one row is a scalar)."""
    names = [label.split("[")[0] for label in labels]
    counts = {name: names.count(name) for name in names}
    seen: dict[str, int] = {}
    out = []
    for name, label in zip(names, labels, strict=True):
        index = seen.get(name, 0)
        seen[name] = index + 1
        out.append(name if counts[name] == 1 and "[" not in label else f"{name}[{index}]")
    return out


def _fit_ml(result: FitResult, prepared: Prepared) -> Fit:
    """SAEM/MCEM: population estimates and SEs from the ``point_estimate`` group (relabelled
    by :func:`flat_point_labels`, the order checked against the posterior's population
    values); genetic values from the conditional draws at the estimate."""
    point = result.inference_data["point_estimate"]
    labels = flat_point_labels([str(x) for x in point["parameter"].values])
    estimate, se = point["estimate"].values, point["se"].values
    _check_order(labels, estimate, result.inference_data.posterior)
    lower, upper = wald_interval(estimate, se)
    rows = [
        {"label": lab, "kind": "population", "estimate": e, "sd": s, "lower": lo, "upper": up}
        for lab, e, s, lo, up in zip(labels, estimate, se, lower, upper, strict=True)
    ]
    posterior = result.inference_data.posterior
    if "genetic_value" in posterior and prepared.genetic_truth is not None:
        draws = posterior["genetic_value"].values
        rows += genetic_rows(draws.reshape(-1, *draws.shape[2:]))
    attrs = result.population_summary.attrs
    metrics = {
        "minus_two_log_likelihood": float(attrs["-2LL"]),
        "minus_two_log_likelihood_mcse": float(attrs.get("-2LL_mcse", np.nan)),
    }
    return Fit(pd.DataFrame(rows), None, metrics)


def _check_order(labels: list[str], estimate: np.ndarray, posterior) -> None:
    """The point estimates, relabelled, equal the posterior's (constant) population values."""
    exported = {}
    for name in dict.fromkeys(label.split("[")[0] for label in labels):
        if name in posterior and "variety" not in posterior[name].dims:
            value = posterior[name].isel(chain=0, draw=0).values
            exported.update(flat_labels(name, value))
    for label, value in zip(labels, estimate, strict=True):
        if label in exported and not np.isclose(exported[label], value, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"point_estimate row {label} = {value} but the posterior has {exported[label]}: "
                "the order of the point_estimate rows is not the sites' C order"
            )


def run_saem(prepared: Prepared, seed: int, options: dict) -> Fit:
    options = {**options}
    if "iterations" in options:
        options["iterations"] = tuple(options["iterations"])
    config = SAEMConfig(seed=seed, progress=False, **options)
    result = fit_saem(prepared.model, prepared.data, config, model_kwargs=prepared.model_kwargs)
    return _fit_ml(result, prepared)


def run_mcem(prepared: Prepared, seed: int, options: dict) -> Fit:
    config = MCEMConfig(seed=seed, progress=False, **options)
    result = fit_mcem(prepared.model, prepared.data, config, model_kwargs=prepared.model_kwargs)
    return _fit_ml(result, prepared)


def _peer(name: str) -> Callable:
    def run(prepared: Prepared, seed: int, options: dict, dataset: str) -> Fit:
        from benchmarks.compare import peers

        return getattr(peers, name)(prepared, seed, options, dataset)

    return run


ENGINE_FUNCTIONS: dict[str, Callable] = {
    "svi-normal": lambda p, s, o, d: run_svi(p, "normal", s, o),
    "svi-lowrank": lambda p, s, o, d: run_svi(p, "lowrank", s, o),
    "svi-amortized": lambda p, s, o, d: run_svi(p, "amortized", s, o),
    "nuts": lambda p, s, o, d: run_nuts(p, s, o),
    "saem": lambda p, s, o, d: run_saem(p, s, o),
    "mcem": lambda p, s, o, d: run_mcem(p, s, o),
    "numpyro-nuts": _peer("numpyro_nuts"),
    "pynlme-saem": _peer("pynlme_saem"),
    "pynlme-nlme": _peer("pynlme_nlme"),
}
