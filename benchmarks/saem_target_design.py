"""SAEM and SVI on the simulated target design (the g2was model with markers, effects form:
SAEM integrates the marker effects out by the kernel-form M-step, ``pyro_nlme.infer.saem.field``):
do they agree on the population parameters within their uncertainty? Appends a section to
``docs/saem_benchmark.md``.

    python benchmarks/saem_target_design.py [--varieties 30] [--markers 500] [--svi-steps 4000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pyro_nlme.data import load_data
from pyro_nlme.infer.saem import SAEMConfig, fit_saem
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate.design import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was


def svi_summary(result, labels_by_site: dict[str, list[str]]) -> pd.DataFrame:
    posterior = result.inference_data.posterior
    rows = {}
    for site, labels in labels_by_site.items():
        values = posterior[site].values
        flat = values.reshape(values.shape[0] * values.shape[1], -1)
        for k, label in enumerate(labels):
            rows[label] = {"svi mean": flat[:, k].mean(), "svi sd": flat[:, k].std()}
    return pd.DataFrame(rows).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--varieties", type=int, default=30)
    parser.add_argument("--markers", type=int, default=500)
    parser.add_argument("--iterations", default="200,100", help="SAEM's K1,K2")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--kernel", default="mala")
    parser.add_argument("--svi-steps", type=int, default=4000)
    parser.add_argument("--out", default="docs/saem_benchmark.md")
    args = parser.parse_args()
    simulated = simulate_design(
        DesignConfig(n_varieties=args.varieties, n_heldout=0, n_markers=args.markers), seed=0
    )
    data = load_data(simulated.phenotypes, markers=simulated.genotype_table())
    iterations = tuple(int(k) for k in args.iterations.split(","))
    kwargs = {"marker_form": "effects"}

    start = time.perf_counter()
    saem = fit_saem(
        g2was,
        data,
        SAEMConfig(iterations=iterations, chains=args.chains, kernel=args.kernel, progress=False),
        model_name="g2was",
        model_kwargs=kwargs,
    )
    saem_seconds = time.perf_counter() - start
    table = saem.population_summary.set_index("parameter")

    start = time.perf_counter()
    svi = fit_svi(
        g2was,
        data,
        SVIConfig(guide="normal", batch_size=None, max_steps=args.svi_steps, progress=False),
        model_name="g2was",
        model_kwargs=kwargs,
    )
    svi_seconds = time.perf_counter() - start

    labels_by_site: dict[str, list[str]] = {}
    for label in table.index:
        labels_by_site.setdefault(label.split("[")[0], []).append(label)
    truth = {}
    for site, labels in labels_by_site.items():
        values = np.asarray(simulated.truth[site].values, dtype=float).reshape(-1)
        truth.update(dict(zip(labels, values, strict=True)))
    frame = table[["estimate", "se"]].rename(columns={"estimate": "saem", "se": "saem SE"})
    frame.insert(0, "truth", pd.Series(truth))
    frame = frame.join(svi_summary(svi, labels_by_site))
    frame["diff / sqrt(SE^2 + sd^2)"] = (frame["saem"] - frame["svi mean"]) / np.sqrt(
        frame["saem SE"].fillna(0.0) ** 2 + frame["svi sd"] ** 2
    )
    frame.index.name = "parameter"
    lines = [
        "",
        "## Simulated target design: SAEM and SVI (g2was with markers, effects form)",
        "",
        f"`python benchmarks/saem_target_design.py --varieties {args.varieties} --markers "
        f"{args.markers} --iterations {args.iterations} "
        f"--chains {args.chains} --kernel {args.kernel} --svi-steps {args.svi_steps}`: "
        f"{args.varieties} varieties x 3 scenarios x 2 plants x 21 days, {args.markers} "
        f"markers (simulator seed 0). SAEM: iterations {iterations}, {args.chains} chains, "
        f"{args.kernel} kernel, JIT, marker effects integrated out in the kernel form, "
        f"{saem_seconds:.0f} s; SVI: mean-field normal guide, full batch, {args.svi_steps} "
        f"steps, {svi_seconds:.0f} s (2 cores shared with other jobs). SAEM's SEs are "
        "conditional on the genetic values at E[g | y] (none for the genetic SDs). Last "
        "column: the difference in units of the combined uncertainty (SAEM's SE and SVI's "
        "posterior SD; SVI's SD alone where SAEM has no SE).",
        "",
        "| parameter | " + " | ".join(frame.columns) + " |",
        "|---|" + "---|" * len(frame.columns),
    ]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    text = "\n".join(lines) + "\n"
    path = Path(args.out)
    path.write_text((path.read_text() if path.exists() else "") + text)
    print(text)


if __name__ == "__main__":
    main()
