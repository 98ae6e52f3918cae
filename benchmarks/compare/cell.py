"""Run one cell in this process and write its result (JSON) — what each cell's subprocess
does::

    python -m benchmarks.compare.cell '<cell json>' --output result.json

The result holds the cell, its status, the machine and package versions, the cell-level
metrics (:func:`score`) and the summary rows (estimate, SD, interval, reference) that
cross-cell scores (agreement with NUTS, bias and RMSE over replicates) are computed from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.compare import metrics as m
from benchmarks.compare.datasets import ORANGE_POPULATION, Prepared, prepare
from benchmarks.compare.engines import ENGINE_FUNCTIONS, Fit
from benchmarks.compare.grid import Cell
from pyro_nlme.export import package_versions
from pyro_nlme.reference import marginal_log_likelihood

PEER_PACKAGES = ("numpyro", "jax", "pynlme")


def source_revision() -> str:
    """The repository's commit, with ``+uncommitted`` when the library or models differ from
    it (the engines are what is measured); ``$PYRO_NLME_SOURCE`` when set (a run from an
    exported tree, e.g. ``git archive``, which has no ``.git``)."""
    if os.environ.get("PYRO_NLME_SOURCE"):
        return os.environ["PYRO_NLME_SOURCE"]
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+uncommitted" if git("status", "--porcelain", "pyro_nlme", "models") else "")


def versions() -> dict[str, str]:
    out = package_versions()
    out["pyro_nlme_source"] = source_revision()
    for name in PEER_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line for line in cpuinfo if line.startswith("model name")).split(":")[1]
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model.strip(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def score(fit: Fit, prepared: Prepared) -> dict:
    """Cell-level scores of a fit against its data set's reference (NaN-free keys only where
    they apply): ``population_rel_rmse``, ``population_coverage90``, ``population_rmse_se``
    (Orange: errors in exact-ML SEs), ``exact_minus_two_log_likelihood`` (Orange: exact -2LL
    at the estimate), ``genetic_r``, ``genetic_coverage90``, ``heldout_r``."""
    out = {}
    summary = fit.summary
    truth = prepared.population_truth
    if truth and not summary.empty:
        rows = summary[summary["label"].isin(list(truth))].set_index("label")
        reference = np.array([truth[label] for label in rows.index])
        out["population_scalars"] = len(rows)
        out["population_rel_rmse"] = m.relative_rmse(rows["estimate"], reference)
        if rows["lower"].notna().all():
            out["population_coverage90"] = m.coverage(rows["lower"], rows["upper"], reference)
        if prepared.population_scale is not None:
            scale = np.array([prepared.population_scale[label] for label in rows.index])
            out["population_rmse_se"] = m.standardised_rmse(rows["estimate"], reference, scale)
        if set(ORANGE_POPULATION) <= set(rows.index) and prepared.population_scale is not None:
            point = torch.tensor(
                [rows.loc[p, "estimate"] for p in ORANGE_POPULATION], dtype=torch.float64
            )
            ll = marginal_log_likelihood(point, prepared.data)
            out["exact_minus_two_log_likelihood"] = -2 * float(ll)
    if prepared.genetic_truth is not None and not summary.empty:
        genetic = summary[summary["kind"] == "genetic"]
        if len(genetic):
            truth_flat = prepared.genetic_truth.ravel()
            shape = prepared.genetic_truth.shape
            out["genetic_r"] = m.mean_correlation(
                genetic["estimate"].to_numpy().reshape(shape), prepared.genetic_truth
            )
            out["genetic_coverage90"] = m.coverage(genetic["lower"], genetic["upper"], truth_flat)
            out["genetic_scalars"] = len(genetic)
    if fit.marker_effect is not None and prepared.heldout_markers is not None:
        effect = torch.as_tensor(fit.marker_effect, dtype=torch.float32)
        predicted = prepared.heldout_markers.standardized_matmul(effect).numpy()
        out["heldout_r"] = m.mean_correlation(predicted, prepared.heldout_truth)
    return out


def reference_columns(summary: pd.DataFrame, prepared: Prepared) -> pd.DataFrame:
    """The summary with the reference value of each row (``truth``; NaN where none)."""
    truth = dict(prepared.population_truth)
    if prepared.genetic_truth is not None:
        n_varieties, n_parameters = prepared.genetic_truth.shape
        for v in range(n_varieties):
            for k in range(n_parameters):
                truth[f"genetic_value[{v},{k}]"] = float(prepared.genetic_truth[v, k])
    if summary.empty:
        return summary
    return summary.assign(truth=summary["label"].map(truth).astype(float))


def run(cell: Cell) -> dict:
    """Prepare the data, fit, score: the result dict (status ``ok``)."""
    started = time.perf_counter()
    prepared = prepare(cell.data, cell.seed)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    fit = ENGINE_FUNCTIONS[cell.engine](prepared, cell.seed, cell.options, cell.data.name)
    wall = time.perf_counter() - started
    summary = reference_columns(fit.summary, prepared)
    return {
        "key": cell.key,
        "cell": json.loads(cell.to_json()),
        "status": "ok",
        "metrics": {
            "wall_s": wall,
            "prepare_s": prepare_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_varieties": prepared.data.n_varieties,
            **fit.metrics,
            **score(fit, prepared),
        },
        "summary": summary.to_dict(orient="list"),
        "versions": versions(),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="the cell as JSON (Cell.to_json)")
    parser.add_argument("--output", required=True, help="where to write the result JSON")
    args = parser.parse_args()
    result = run(Cell.from_json(args.cell))
    with open(args.output, "w") as out:
        json.dump(result, out, default=float)


if __name__ == "__main__":
    main()
