"""Method-comparison benchmark: run a preset grid of cells (engines x data sets x seeds), then
write the tables and figures.

    python -m benchmarks.compare --preset quick                 # ~10 min on 2 cores
    python -m benchmarks.compare --preset full --seeds 3        # the paper's grid (days)
    python -m benchmarks.compare --preset full --scheduler tcp://host:8786
    python -m benchmarks.compare --preset quick --report-only   # tables from the results

Finished cells are skipped on a rerun (``--retry`` reruns timed-out and failed ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.compare.grid import ENGINES, PRESETS, full_grid
from benchmarks.compare.report import load_results, write_report
from benchmarks.compare.runner import execute

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "compare"


def reproducing_command(args: argparse.Namespace) -> str:
    """The command that regenerates these cells (without run-control flags)."""
    parts = ["python -m benchmarks.compare", f"--preset {args.preset}"]
    if args.seeds:
        parts.append(f"--seeds {args.seeds}")
    if args.engines:
        parts.append("--engines " + " ".join(args.engines))
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seeds", type=int, default=None, help="replicates (full preset)")
    parser.add_argument("--engines", nargs="*", choices=ENGINES, help="only these engines")
    parser.add_argument(
        "--out", type=Path, default=None, help="default docs/benchmarks/compare/<preset>"
    )
    parser.add_argument("--executor", choices=["dask", "local"], default="dask")
    parser.add_argument("--scheduler", default=None, help="address of a Dask scheduler")
    parser.add_argument("--workers", type=int, default=None, help="parallel cells (default: cores)")
    parser.add_argument("--retry", action="store_true", help="rerun timed-out and failed cells")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)

    if args.preset == "full" and args.seeds:
        cells = full_grid(tuple(range(args.seeds)))
    else:
        cells = PRESETS[args.preset]()
    if args.engines:
        cells = [c for c in cells if c.engine in args.engines]
    out = args.out or DOCS / args.preset
    results = out / "cells"
    if not args.report_only:
        execute(
            cells,
            results,
            executor=args.executor,
            scheduler=args.scheduler,
            workers=args.workers,
            retry=args.retry,
        )
    table = write_report(load_results(results, cells), out, reproducing_command(args))
    print(table[["engine", "dataset", "seed", "status", "wall_s"]].to_string(index=False))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
