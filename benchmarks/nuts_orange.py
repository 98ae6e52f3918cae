"""NUTS on Orange against the exact posterior and the exact maximum likelihood.

Orange (``models/orange.py``: random asymptote per tree, vague priors) has a closed-form
marginal likelihood, so its population posterior is known exactly
(:func:`pyro_nlme.reference.exact_posterior.exact_posterior`). This script fits it by NUTS
(centred, float64, dense mass matrix, Laplace start) and writes ``docs/benchmarks/
nuts_orange.md``: per parameter the MLE, the exact MAP, the exact mean and SD, the NUTS mean,
SD, Monte-Carlo SE, bulk ESS and r_hat, the NUTS posterior mode (the maximum of a Gaussian
kernel density estimate of the pooled draws, Silverman bandwidth, with its Monte-Carlo error
from the spread of the per-chain modes), and the distances the issue asks about.

Usage::

    python benchmarks/nuts_orange.py --chains 4 --warmup 300 --samples 500
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import gaussian_kde

from pyro_nlme.data import load_orange
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.reference import exact_mle
from pyro_nlme.reference.exact_posterior import exact_posterior
from pyro_nlme_models.orange import orange

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def kde_mode(draws: np.ndarray) -> float:
    """Maximum of a Gaussian KDE (Silverman bandwidth) of 1-D draws, on a 2,000-point grid."""
    grid = np.linspace(np.quantile(draws, 0.005), np.quantile(draws, 0.995), 2000)
    return float(grid[np.argmax(gaussian_kde(draws, bw_method="silverman")(grid))])


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    for row in frame.itertuples(False):
        lines.append(
            "| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_orange()
    data64 = dataclasses.replace(
        data,
        times=data.times.double(),
        values=data.values.double(),
        covariate_design=data.covariate_design.double(),
    )
    mle = exact_mle(data)
    exact = exact_posterior(orange, data)
    config = NUTSConfig(
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        reparam=False,
        seed=args.seed,
        progress=False,
    )
    start = time.perf_counter()
    fit = fit_nuts(orange, data64, config)
    wall = time.perf_counter() - start
    table = fit.population_summary
    rows = []
    for i, name in enumerate(exact.names):
        draws = fit.inference_data.posterior[name].values
        chain_modes = [kde_mode(chain) for chain in draws]
        mode = kde_mode(draws.ravel())
        mode_se = float(np.std(chain_modes, ddof=1) / np.sqrt(len(chain_modes)))
        mean, sd = float(table.loc[name, "mean"]), float(table.loc[name, "sd"])
        rows.append(
            {
                "parameter": name,
                "MLE": mle.estimate[name],
                "exact MAP": float(exact.mode[i]),
                "NUTS KDE mode": mode,
                "mode MC SE": mode_se,
                "(mode - MLE) / MC SE": (mode - mle.estimate[name]) / mode_se,
                "exact mean": float(exact.mean[i]),
                "NUTS mean": mean,
                "NUTS MCSE": float(table.loc[name, "mcse_mean"]),
                "exact SD": float(exact.sd[i]),
                "NUTS SD": sd,
                "(NUTS - exact mean) / SE": (mean - exact.mean[i])
                / np.hypot(table.loc[name, "mcse_mean"], exact.mean_se[i]),
                "(NUTS mean - MLE) / SD": (mean - mle.estimate[name]) / sd,
                "ess_bulk": float(table.loc[name, "ess_bulk"]),
                "r_hat": float(table.loc[name, "r_hat"]),
            }
        )
    frame = pd.DataFrame(rows)
    stats = fit.inference_data.sample_stats
    lines = [
        "# NUTS on Orange against the exact posterior",
        "",
        f"Command: `python benchmarks/nuts_orange.py --chains {args.chains} --warmup "
        f"{args.warmup} --samples {args.samples} --seed {args.seed}`",
        "",
        f"Centred, float64, dense mass matrix, Laplace start. Wall time {wall:.0f} s "
        f"({args.chains} chains run one after the other); divergences "
        f"{int(stats['diverging'].sum())}; mean tree depth "
        f"{float(stats['tree_depth'].mean()):.1f}; "
        f"step sizes {', '.join(f'{s:.3f}' for s in fit.history['step_size'])}; importance ESS "
        f"of the exact posterior {exact.importance_ess:.0f}.",
        "",
        markdown_table(frame),
        "",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "nuts_orange.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
