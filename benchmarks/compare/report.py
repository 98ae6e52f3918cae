"""From the cells' result files to the outputs: tidy CSVs, a markdown report and figures.

- ``cells.csv``: one row per cell (settings, seed, status, versions, every metric, and the
  agreement with the NUTS fit of the same data and seed where there is one).
- ``parameters.csv``: one row per cell x scored scalar (estimate, SD, 90% interval, truth).
- ``population_errors.csv``: per engine x data set x population scalar, over replicate seeds:
  bias, RMSE and coverage of the 90% intervals.
- ``report.md``: the command, machine and versions, the table (medians over seeds) and the
  figures ``accuracy_vs_time.png``, ``coverage.png``, ``time_vs_varieties.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.compare import metrics as m
from benchmarks.compare.grid import Cell

REFERENCES = ("nuts", "numpyro-nuts")
# A NUTS fit is a reference only if its chains agree: beyond this r_hat its means and SDs are
# not the posterior's (e.g. a chain stuck in a far mode), and the agreement is left blank.
R_HAT_REFERENCE = 1.05
AGREEMENT = (
    "nuts_scalars",
    "nuts_mean_abs_z",
    "nuts_max_abs_z",
    "nuts_median_sd_ratio",
    "nuts_reference_max_r_hat",
)
TABLE_METRICS = {
    "wall_s": "wall (s)",
    "peak_rss_mb": "peak RSS (MB)",
    "elbo": "ELBO",
    "minus_two_log_likelihood": "-2LL",
    "exact_minus_two_log_likelihood": "exact -2LL at estimate",
    "population_rel_rmse": "pop. rel. RMSE",
    "population_rmse_se": "pop. RMSE (exact SEs)",
    "population_coverage90": "pop. cov. 90%",
    "genetic_r": "r(genetic)",
    "genetic_coverage90": "genetic cov. 90%",
    "heldout_r": "r(held-out)",
    "nuts_mean_abs_z": "NUTS mean abs z",
    "nuts_median_sd_ratio": "SD / NUTS SD",
    "max_r_hat": "max r_hat",
    "divergences": "divergences",
}


def load_results(results: Path, cells: list[Cell] | None = None) -> list[dict]:
    """The result files (of ``cells`` only, if given), in the grid's order."""
    paths = (
        [Path(results) / f"{c.key}.json" for c in cells]
        if cells is not None
        else sorted(Path(results).glob("*.json"))
    )
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def _data_label(data: dict) -> str:
    from benchmarks.compare.grid import DataSpec

    return DataSpec(**data).label


def cells_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        cell = r["cell"]
        row = {
            "key": r["key"],
            "engine": cell["engine"],
            "dataset": _data_label(cell["data"]),
            "data": cell["data"]["name"],
            "size": cell["data"]["size"],
            "n_markers": cell["data"]["n_markers"],
            "marker_form": cell["data"]["marker_form"] if cell["data"]["n_markers"] else "",
            "seed": cell["seed"],
            "settings": json.dumps(cell["settings"], sort_keys=True),
            "time_limit_s": cell["time_limit_s"],
            "status": r["status"],
            **r["metrics"],
        }
        row.setdefault("n_varieties", cell["data"]["n_varieties"] or np.nan)
        row.update({f"version_{k}": v for k, v in r.get("versions", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def parameters_table(results: list[dict]) -> pd.DataFrame:
    frames = []
    for r in results:
        if r["status"] != "ok" or not r.get("summary"):
            continue
        frame = pd.DataFrame(r["summary"])
        frame.insert(0, "key", r["key"])
        frame.insert(1, "engine", r["cell"]["engine"])
        frame.insert(2, "dataset", _data_label(r["cell"]["data"]))
        frame.insert(3, "seed", r["cell"]["seed"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def add_nuts_agreement(cells: pd.DataFrame, parameters: pd.DataFrame) -> pd.DataFrame:
    """Columns ``nuts_*`` (:func:`metrics.nuts_agreement`) against the NUTS cell (ours, else
    NumPyro's) of the same data set and seed, and that reference's ``nuts_reference``,
    ``nuts_reference_max_r_hat``. The reference is the first whose population r_hat is at
    most :data:`R_HAT_REFERENCE`; with none such, the agreement is left blank."""
    cells = cells.copy()
    for column in AGREEMENT:
        cells[column] = np.nan
    cells["nuts_reference"] = None
    if parameters.empty:
        return cells
    ok = cells[cells["status"] == "ok"]
    for index, row in ok.iterrows():
        same = ok[(ok["dataset"] == row["dataset"]) & (ok["seed"] == row["seed"])]
        candidates = [
            ref
            for engine in REFERENCES
            for _, ref in same[(same["engine"] == engine) & (same["key"] != row["key"])].iterrows()
        ]
        if not candidates:
            continue
        converged = [r for r in candidates if r.get("max_r_hat", np.nan) <= R_HAT_REFERENCE]
        ref = (converged or candidates)[0]
        cells.loc[index, "nuts_reference"] = ref["engine"]
        cells.loc[index, "nuts_reference_max_r_hat"] = ref.get("max_r_hat", np.nan)
        if not converged:
            continue
        mine = parameters[parameters["key"] == row["key"]]
        theirs = parameters[parameters["key"] == ref["key"]]
        agreement = m.nuts_agreement(
            mine[["label", "estimate", "sd"]], theirs[["label", "estimate", "sd"]]
        )
        for name, value in agreement.items():
            cells.loc[index, name] = value
    return cells


def population_errors(parameters: pd.DataFrame) -> pd.DataFrame:
    """Bias, RMSE and 90% coverage over replicate seeds, per engine x data set x scalar."""
    if parameters.empty:
        return pd.DataFrame()
    scored = parameters[(parameters["kind"] == "population") & parameters["truth"].notna()]
    rows = []
    for (engine, dataset, label), group in scored.groupby(["engine", "dataset", "label"]):
        bias, rmse = m.bias_rmse(group["estimate"], group["truth"])
        rows.append(
            {
                "engine": engine,
                "dataset": dataset,
                "label": label,
                "seeds": len(group),
                "truth_mean": group["truth"].mean(),
                "bias": float(bias),
                "rmse": float(rmse),
                "coverage90": m.coverage(group["lower"], group["upper"], group["truth"])
                if group["lower"].notna().all()
                else np.nan,
            }
        )
    return pd.DataFrame(rows)


def summary_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Medians over seeds per data set x engine, with ``ok/total`` cells."""
    rows = []
    for (dataset, engine), group in cells.groupby(["dataset", "engine"], sort=False):
        done = group[group["status"] == "ok"]
        statuses = ", ".join(f"{s} {n}" for s, n in group["status"].value_counts().items())
        row = {"data set": dataset, "engine": engine, "cells": statuses}
        for column, title in TABLE_METRICS.items():
            if column in done and done[column].notna().any():
                row[title] = float(done[column].median())
        rows.append(row)
    columns = ["data set", "engine", "cells", *TABLE_METRICS.values()]
    table = pd.DataFrame(rows).reindex(columns=columns)
    return table.dropna(axis=1, how="all")


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (no ``tabulate`` dependency)."""

    def cell(value) -> str:
        if isinstance(value, float | np.floating):
            return "" if np.isnan(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def figures(cells: pd.DataFrame, out: Path) -> list[str]:
    """The three figures (PNG, matplotlib): the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    def log_axes(ax) -> None:
        """Log scales spanning at least a decade (so that a major tick is labelled)."""
        ax.set(xscale="log", yscale="log")
        for limits, set_limits, axis in (
            (ax.get_xlim, ax.set_xlim, ax.xaxis),
            (ax.get_ylim, ax.set_ylim, ax.yaxis),
        ):
            low, high = limits()
            if high / low < 10:
                middle = np.sqrt(low * high)
                set_limits(middle / 3.2, middle * 3.2)
            axis.set_minor_formatter(NullFormatter())

    ok = cells[cells["status"] == "ok"]
    engines = sorted(cells["engine"].unique())
    colours = {e: plt.cm.tab10(i % 10) for i, e in enumerate(engines)}
    written = []

    scored = ok[ok.get("population_rel_rmse", pd.Series(dtype=float)).notna()]
    if len(scored):
        datasets = list(dict.fromkeys(scored["dataset"]))
        fig, axes = plt.subplots(
            1,
            len(datasets),
            figsize=(4.2 * len(datasets) + 1.5, 3.6),
            squeeze=False,
            layout="constrained",
        )
        for ax, dataset in zip(axes[0], datasets, strict=True):
            part = scored[scored["dataset"] == dataset]
            for engine, group in part.groupby("engine"):
                ax.scatter(
                    group["wall_s"],
                    group["population_rel_rmse"],
                    color=colours[engine],
                    label=engine,
                )
            log_axes(ax)
            ax.set(title=dataset, xlabel="wall time (s)")
        axes[0][0].set_ylabel("population parameters: relative RMSE")
        present = sorted(scored["engine"].unique())
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[e]) for e in present]
        fig.legend(handles, present, loc="outside right center", fontsize=8)
        fig.savefig(out / "accuracy_vs_time.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_time.png")

    columns = [c for c in ("population_coverage90", "genetic_coverage90") if c in ok]
    covered = ok.dropna(subset=columns, how="all") if columns else ok.iloc[:0]
    if len(covered):
        fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 3.8), squeeze=False)
        for ax, column in zip(axes[0], columns, strict=True):
            part = covered.dropna(subset=[column])
            groups = part.groupby(["dataset", "engine"])
            means = groups[column].mean()
            count = column.replace("coverage90", "scalars")
            counts = groups[count].sum(min_count=1) if count in part else means * np.nan
            labels = [f"{d}\n{e}" for d, e in means.index]
            bars = ax.bar(
                range(len(means)), means.to_numpy(), color=[colours[e] for _, e in means.index]
            )
            ax.bar_label(bars, ["" if np.isnan(n) else f"n={n:.0f}" for n in counts], fontsize=7)
            ax.axhline(m.PROBABILITY, color="black", linestyle="--", linewidth=1)
            ax.set_xticks(range(len(means)), labels, rotation=60, ha="right", fontsize=7)
            ax.set(ylim=(0, 1.05), ylabel="share of truths inside 90% intervals", title=column)
        fig.tight_layout()
        fig.savefig(out / "coverage.png", dpi=120)
        plt.close(fig)
        written.append("coverage.png")

    design = ok[ok["data"] == "design"]
    if len(design):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (engine, markers), group in design.groupby(["engine", "n_markers"]):
            points = group.groupby("n_varieties")["wall_s"].median()
            style = "-o" if markers else "--s"
            label = f"{engine} ({markers} markers)" if markers else f"{engine} (no markers)"
            ax.plot(points.index, points.to_numpy(), style, color=colours[engine], label=label)
        log_axes(ax)
        ax.set(xlabel="phenotyped varieties", ylabel="wall time (s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "time_vs_varieties.png", dpi=120)
        plt.close(fig)
        written.append("time_vs_varieties.png")
    return written


def write_report(results: list[dict], out: Path, command: str) -> pd.DataFrame:
    """Write the CSVs, the figures and ``report.md`` into ``out``; returns the cells table."""
    if not results:
        raise ValueError(f"no cell results to report on: run the cells first (into {out}/cells)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = cells_table(results)
    parameters = parameters_table(results)
    cells = add_nuts_agreement(cells, parameters)
    cells.to_csv(out / "cells.csv", index=False)
    parameters.to_csv(out / "parameters.csv", index=False)
    errors = population_errors(parameters)
    errors.to_csv(out / "population_errors.csv", index=False)
    table = summary_table(cells)
    (out / "table.md").write_text(markdown(table) + "\n")
    names = figures(cells, out)
    machine = next((r["machine"] for r in results if "machine" in r), {})
    versions = next((r["versions"] for r in results if "versions" in r), {})
    lines = [
        "# Method comparison",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB; {machine.get('platform', '')}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Medians over replicate seeds; `cells` counts the cells by status. Every cell: "
        "`cells.csv`; every scored scalar: `parameters.csv`; bias and RMSE over seeds: "
        "`population_errors.csv`.",
        "",
        markdown(table),
        "",
        *[f"![{name}]({name})" for name in names],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return cells
