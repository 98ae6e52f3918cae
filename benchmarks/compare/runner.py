"""Run cells: each in its own process with a time limit, skipping finished ones, on a local
Dask cluster (default), a remote Dask scheduler, or in this process's threads (``local``).

A cell's result is written to ``<results>/<key>.json`` by the client as it arrives, so an
interrupted run loses only the cells in flight. A cell over its limit is killed (its whole
process group) and recorded with status ``timeout``; one that raises, with status ``error``
and the tail of its stderr. Both are final unless ``retry`` is set.

With a remote scheduler, the scheduler and every worker need this repository on their
``PYTHONPATH`` (they unpickle the launcher and the cells), at the same path on every worker
machine (the cell runs ``python -m benchmarks.compare.cell`` from its root), with the package
installed; results travel back through Dask, so no shared file system is needed::

    PYTHONPATH=$PWD dask scheduler                      # on one machine, in the repository
    PYTHONPATH=$PWD dask worker tcp://HOST:8786 --nworkers 16 --nthreads 1   # on each machine
    python -m benchmarks.compare --preset full --scheduler tcp://HOST:8786
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.compare.grid import Cell

ROOT = Path(__file__).resolve().parents[2]
FINAL = ("ok", "timeout", "error")
STDERR_TAIL = 3000


def result_path(results: Path, cell: Cell) -> Path:
    return Path(results) / f"{cell.key}.json"


def finished(results: Path, cell: Cell, retry: bool = False) -> bool:
    """Whether the cell has a result (with ``retry``: a successful one)."""
    path = result_path(results, cell)
    if not path.exists():
        return False
    status = json.loads(path.read_text()).get("status")
    return status == "ok" or (status in FINAL and not retry)


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TQDM_DISABLE"] = "1"
    return env


def run_in_subprocess(cell: Cell, threads: int = 1) -> dict:
    """Run ``cell`` in a child process (its own session) within ``cell.time_limit_s``.

    :returns: the cell's result dict; status ``timeout`` or ``error`` when it did not finish.
    """
    with tempfile.TemporaryDirectory(prefix="compare-cell-") as scratch:
        output = Path(scratch) / "result.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.compare.cell",
            cell.to_json(),
            "--output",
            str(output),
        ]
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_thread_env(threads),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=cell.time_limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return _failed(cell, "timeout", time.perf_counter() - started, "")
        if process.returncode == 0 and output.exists():
            return json.loads(output.read_text())
        return _failed(cell, "error", time.perf_counter() - started, stderr[-STDERR_TAIL:])


def _failed(cell: Cell, status: str, seconds: float, stderr: str) -> dict:
    return {
        "key": cell.key,
        "cell": json.loads(cell.to_json()),
        "status": status,
        "metrics": {"wall_s": seconds},
        "stderr": stderr,
    }


def _record(results: Path, result: dict) -> None:
    path = Path(results) / f"{result['key']}.json"
    path.write_text(json.dumps(result, indent=1, default=float))


def execute(
    cells: Iterable[Cell],
    results: Path,
    *,
    executor: str = "dask",
    scheduler: str | None = None,
    workers: int | None = None,
    retry: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Run the cells not yet finished; write each result as it arrives.

    :param executor: ``dask`` (a :class:`dask.distributed.LocalCluster` of ``workers``
        single-threaded workers, or the cluster at ``scheduler``) or ``local`` (``workers``
        threads in this process, each launching cell processes; no Dask needed).
    :param workers: parallel cells (default: the number of cores).
    :returns: the results of the cells run now.
    """
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    unique = {c.key: c for c in cells}.values()
    todo = [c for c in unique if not finished(results, c, retry)]
    workers = workers or os.cpu_count() or 1
    # One thread per cell on a remote cluster (one single-threaded worker per core there).
    threads = 1 if scheduler else max(1, (os.cpu_count() or 1) // workers)
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)
    done = []
    if executor == "local" or not todo:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run_in_subprocess, c, threads) for c in todo]
            for future in as_completed(futures):
                done.append(_finish(results, future.result(), bar))
    elif executor == "dask":
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed

        cluster = None
        if scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
        with Client(scheduler or cluster) as client:
            futures = [
                client.submit(run_in_subprocess, c, threads, key=f"cell-{c.key}", pure=False)
                for c in todo
            ]
            for future in dask_completed(futures):
                done.append(_finish(results, future.result(), bar))
        if cluster is not None:
            cluster.close()
    else:
        raise ValueError(f"executor must be 'dask' or 'local', got {executor!r}")
    bar.close()
    return done


def _finish(results: Path, result: dict, bar) -> dict:
    _record(results, result)
    bar.set_postfix_str(f"{result['cell']['engine']} {result['status']}")
    bar.update()
    return result
