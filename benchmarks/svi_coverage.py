"""Coverage of SVI's 90% intervals (amortised guide) on simulated designs, over repeated seeds.

For each seed: simulate a design (by default the 60-variety design of the slow recovery test
and of ``docs/benchmarks/nuts_small_design.md``: 60 varieties x 3 scenarios x 2 plants x 21
days, 500 markers), fit ``g2was`` in the centred kinship form by SVI with the README's settings
(amortised guide anchored at conditional modes, the genetic values' eigen-components
non-centred, lr 0.02 decaying over 2,500 steps, plateau rule, not before ``--min-steps``), and
check whether the equal-tailed 90% interval of each target covers the simulator's value:

- every plant's curve parameters (``individual_parameter`` of the truth), all together and per
  curve parameter;
- the 9 scenario means; the genetic, variety x scenario and plant SDs (3 each); the noise SD.

Population-level truths are the simulator's parameters, not draws from the model's prior, so
calibrated intervals cover them at about the nominal rate only to the extent that the data
dominate the prior (60 varieties: the SDs of the variety-level effects are estimated to about
10%). Monte-Carlo errors as in ``benchmarks/nuts_coverage.py`` (binomial, and clustered by
seed: the honest one). Writes ``docs/benchmarks/svi_coverage.{csv,md}`` (with
``--correlated-events``, a full covariance per plant's curve parameters:
``svi_coverage_correlated.{csv,md}``; ``--stem`` names other files; the population scalars'
standardised errors go to ``{stem}_z.csv``) after every seed;
``--resume`` keeps the seeds already there.

    OMP_NUM_THREADS=1 python benchmarks/svi_coverage.py --seeds 10
    OMP_NUM_THREADS=1 python benchmarks/svi_coverage.py --seeds 8 --varieties 250 \\
        --markers 60000 --batch-size 64 --stem svi_coverage_target_design
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from nuts_coverage import (
    covered,
    curve_parameter_rows,
    curve_parameters,
    markdown_table,
    summarise,
)

from pyro_nlme.data import load_data
from pyro_nlme.export import package_versions
from pyro_nlme.infer.stopping import PlateauRule
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
POPULATION = ("scenario_mean", "genetic_sd", "variety_scenario_sd", "plant_sd", "noise_sd")
"""Population sites scored, as named in the truth and in the posterior."""


def aligned(truth: xr.DataArray, draws: xr.DataArray) -> np.ndarray:
    """``truth`` on the labels and in the dim order of ``draws`` (less chain and draw)."""
    dims = draws.dims[2:]
    return truth.sel({dim: draws[dim].values for dim in dims}).transpose(*dims).values


def standardized_errors(seed: int, posterior: xr.Dataset, truth: xr.Dataset) -> list[dict]:
    """Per population scalar: ``(posterior mean - truth) / posterior SD``. Over seeds, a
    calibrated posterior gives a mean near 0 and an SD near 1 (less where the prior pulls); a
    mean away from 0 is a bias, an SD above 1 intervals too narrow."""
    rows = []
    for name in POPULATION:
        draws = posterior[name]
        mean, sd = draws.mean(("chain", "draw")), draws.std(("chain", "draw"))
        z = (mean.values - aligned(truth[name], draws)) / sd.values
        for index, value in np.ndenumerate(z):
            labels = ", ".join(
                str(draws[dim].values[i]) for dim, i in zip(draws.dims[2:], index, strict=True)
            )
            rows.append({"seed": seed, "target": name, "element": labels, "z": value})
    return rows


def run_seed(seed: int, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    design = DesignConfig(
        n_varieties=args.varieties,
        n_markers=args.markers,
        n_plants=args.plants,
        n_days=args.days,
    )
    sim = simulate_design(design, seed=seed)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    config = SVIConfig(
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        lr=args.lr,
        lr_decay_steps=args.lr_decay_steps,
        stopping=PlateauRule(min_steps=args.min_steps),
        noncentred_sites=("genetic_value_component",),
        num_draws=args.draws,
        correlated_events=args.correlated_events,
        correlated_plates=tuple(args.correlated_plates),
        exact_levels=tuple(args.exact_levels),
        variety_offsets=args.variety_offsets,
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    fit = fit_svi(
        g2was, data, config, model_kwargs={"marker_form": "kinship", "parametrization": "centred"}
    )
    posterior = fit.inference_data.posterior
    common = {"seed": seed, "wall_s": time.perf_counter() - start, "steps": len(fit.history)}
    phi = curve_parameters(posterior)
    inside = covered(phi, aligned(sim.truth["individual_parameter"], phi))
    present = np.broadcast_to(data.plant_mask.numpy()[..., None], inside.shape)
    rows = curve_parameter_rows(common, inside, present, phi["curve_parameter"].values)
    for name in POPULATION:
        hits = covered(posterior[name], aligned(sim.truth[name], posterior[name]))
        rows.append({**common, "target": name, "n": hits.size, "covered": int(hits.sum())})
    return rows, standardized_errors(seed, posterior, sim.truth)


def report_markdown(frame: pd.DataFrame, errors: pd.DataFrame, args: argparse.Namespace) -> str:
    per_fit = frame.groupby("seed")[["wall_s", "steps"]].first()
    command = (
        f"OMP_NUM_THREADS={args.threads} python benchmarks/svi_coverage.py --seeds {args.seeds} "
        f"--first-seed {args.first_seed} --varieties {args.varieties} --markers {args.markers} "
        f"--plants {args.plants} --days {args.days} --batch-size {args.batch_size} "
        f"--max-steps {args.max_steps} --min-steps {args.min_steps} --lr {args.lr} "
        f"--lr-decay-steps {args.lr_decay_steps} "
        f"--draws {args.draws} --threads {args.threads}"
        + (" --correlated-events" if args.correlated_events else "")
        + "".join(f" --correlated-plates {name}" for name in args.correlated_plates)
        + "".join(f" --exact-levels {name}" for name in args.exact_levels)
        + (" --variety-offsets" if args.variety_offsets else "")
        + (f" --stem {args.stem}" if args.stem else "")
    )
    by_seed = frame.pivot_table(index="seed", columns="target", values="covered", sort=False)
    z = errors.groupby(["target", "element"], sort=False)["z"]
    z_table = pd.DataFrame({"seeds": z.size(), "mean_z": z.mean(), "sd_z": z.std(ddof=1)})
    return "\n".join(
        [
            "# SVI 90% interval coverage on simulated designs (amortised guide"
            + (", correlated events" if args.correlated_events else "")
            + "".join(f", correlated over {name}" for name in args.correlated_plates)
            + "".join(f", {name} exact" for name in args.exact_levels)
            + (", variety offsets" if args.variety_offsets else "")
            + ")",
            "",
            f"Command: `{command}`",
            "",
            f"g2was, centred kinship form; {per_fit.shape[0]} seed(s); nominal 90% equal-tailed "
            f"intervals from {args.draws} draws of the fitted guide. Steps to the plateau "
            f"rule: median {per_fit['steps'].median():.0f} (range {per_fit['steps'].min()}-"
            f"{per_fit['steps'].max()}); wall time per fit: median "
            f"{per_fit['wall_s'].median():.0f} s on {args.threads} thread(s). Versions: "
            f"{json.dumps(package_versions())}",
            "",
            markdown_table(summarise(frame)),
            "",
            "Intervals covered per seed:",
            "",
            markdown_table(by_seed.reset_index()),
            "",
            "Population scalars: posterior mean minus truth, in posterior SDs, over seeds (a "
            "mean away from 0 is a bias; an SD above 1, intervals too narrow):",
            "",
            markdown_table(z_table.reset_index()),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--varieties", type=int, default=60)
    parser.add_argument("--markers", type=int, default=500)
    parser.add_argument("--plants", type=int, default=2)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=7500)
    parser.add_argument(
        "--min-steps",
        type=int,
        default=PlateauRule.min_steps,
        help="no plateau stop before this many steps",
    )
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--lr-decay-steps", type=int, default=2500)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--correlated-events", action="store_true")
    parser.add_argument("--correlated-plates", nargs="*", default=[])
    parser.add_argument("--exact-levels", nargs="*", default=[])
    parser.add_argument("--variety-offsets", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already written")
    parser.add_argument(
        "--stem",
        help="output file stem in docs/benchmarks (default: svi_coverage, or "
        "svi_coverage_correlated with --correlated-events)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stem = args.stem or ("svi_coverage_correlated" if args.correlated_events else "svi_coverage")
    csv, z_csv = OUT / f"{stem}.csv", OUT / f"{stem}_z.csv"
    rows = pd.read_csv(csv).to_dict("records") if args.resume and csv.exists() else []
    errors = pd.read_csv(z_csv).to_dict("records") if args.resume and z_csv.exists() else []
    done = {row["seed"] for row in rows}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if seed in done:
            continue
        seed_rows, seed_errors = run_seed(seed, args)
        rows, errors = rows + seed_rows, errors + seed_errors
        frame, error_frame = pd.DataFrame(rows), pd.DataFrame(errors)
        frame.to_csv(csv, index=False)
        error_frame.to_csv(z_csv, index=False)
        (OUT / f"{stem}.md").write_text(report_markdown(frame, error_frame, args))
        latest = frame[frame["seed"] == seed]
        print(
            f"seed {seed}: "
            + ", ".join(f"{r.target} {r.covered}/{r.n}" for r in latest.itertuples())
            + f"; {latest['wall_s'].iloc[0]:.0f} s, {latest['steps'].iloc[0]} steps",
            flush=True,
        )


if __name__ == "__main__":
    main()
