"""Running cells: skipping finished ones, time limits, and a two-cell end-to-end run with the
local executor (no Dask). Each cell runs in a child process, as in the benchmark."""

import json
import time

import pandas as pd

from benchmarks.compare.grid import ORANGE, Cell, DataSpec
from benchmarks.compare.report import load_results, write_report
from benchmarks.compare.runner import execute, finished, result_path

FEW_STEPS = (("max_steps", 30), ("batch_size", None), ("num_draws", 20), ("lr", 0.02))


def test_a_finished_cell_is_skipped_on_rerun(tmp_path):
    cell = Cell("svi-normal", ORANGE, 0, FEW_STEPS, 60)
    result_path(tmp_path, cell).write_text(json.dumps({"key": cell.key, "status": "ok"}))
    started = time.perf_counter()
    assert execute([cell], tmp_path, executor="local", progress=False) == []
    assert time.perf_counter() - started < 1.0  # no process was started


def test_timed_out_and_failed_cells_are_final_unless_retried(tmp_path):
    cell = Cell("svi-normal", ORANGE, 0, FEW_STEPS, 60)
    for status in ("timeout", "error"):
        result_path(tmp_path, cell).write_text(json.dumps({"key": cell.key, "status": status}))
        assert finished(tmp_path, cell)
        assert not finished(tmp_path, cell, retry=True)


def test_a_cell_over_its_limit_is_recorded_as_timed_out(tmp_path):
    # Importing torch and Pyro alone takes longer than the limit.
    cell = Cell("svi-normal", ORANGE, 0, (("max_steps", 10**6),), time_limit_s=1.0)
    started = time.perf_counter()
    (result,) = execute([cell], tmp_path, executor="local", progress=False)
    assert time.perf_counter() - started < 20.0  # killed, not waited for
    assert result["status"] == "timeout"
    stored = json.loads(result_path(tmp_path, cell).read_text())
    assert stored["status"] == "timeout" and stored["metrics"]["wall_s"] >= 1.0


def test_two_cells_end_to_end_with_the_local_executor(tmp_path):
    tiny = DataSpec("design", n_varieties=6, n_heldout=3, n_markers=100)
    cells = [
        Cell("svi-normal", ORANGE, 0, FEW_STEPS, 240),
        Cell("svi-normal", tiny, 0, FEW_STEPS, 240),
    ]
    results = execute(cells, tmp_path / "cells", executor="local", workers=2, progress=False)
    assert sorted(r["status"] for r in results) == ["ok", "ok"], [r.get("stderr") for r in results]
    table = write_report(load_results(tmp_path / "cells", cells), tmp_path, "test")
    assert len(table) == 2
    orange, design = (table.set_index("dataset").loc[c.data.label] for c in cells)
    for row in (orange, design):
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0 and pd.notna(row["elbo"])
        assert 0 <= row["population_coverage90"] <= 1
    assert pd.notna(orange["exact_minus_two_log_likelihood"])
    assert -1 <= design["genetic_r"] <= 1 and -1 <= design["heldout_r"] <= 1
    parameters = pd.read_csv(tmp_path / "parameters.csv")
    assert set(parameters["kind"]) == {"population", "genetic"}
    assert (tmp_path / "report.md").exists()
