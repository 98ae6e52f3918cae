"""Loading a large genotype table: wall time and peak memory of ``read_genotypes``.

Writes a CSV of ``--varieties`` x ``--markers`` random dosages (not timed), then reads it in a
child process and reports that process's peak resident memory next to the int8 size and the
size one float64 copy would take.

    python benchmarks/genotype_loading.py --varieties 10000 --markers 60000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pyro_nlme.simulate.design import write_markers_csv


def read(path: str) -> dict:
    from pyro_nlme.data import read_genotypes

    started = time.perf_counter()
    ids, matrix = read_genotypes(path)
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "varieties": len(ids),
        "markers": matrix.n_markers,
        "dtype": str(matrix.dosages.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--varieties", type=int, default=10_000)
    parser.add_argument("--markers", type=int, default=60_000)
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(args.read)))
        return
    rng = np.random.default_rng(0)
    dosages = rng.integers(0, 3, (args.varieties, args.markers), dtype=np.int8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "markers.csv"
        write_markers_csv(
            path,
            [f"V{i:05d}" for i in range(args.varieties)],
            [f"m{j}" for j in range(args.markers)],
            dosages,
        )
        del dosages
        size_mb = path.stat().st_size / 2**20
        command = [sys.executable, __file__, "--read", str(path)]
        result = json.loads(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[
                -1
            ]
        )
    cells = args.varieties * args.markers
    result.update(
        csv_mb=round(size_mb),
        int8_mb=round(cells / 2**20),
        float64_copy_mb=round(8 * cells / 2**20),
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
