"""Coverage of NUTS 90% intervals on small simulated designs, over repeated seeds.

For each seed: simulate a small design (``pyro_nlme.simulate``), fit ``g2was`` in kinship form by
NUTS, and check whether the equal-tailed 90% posterior interval of each target covers the truth.
Targets are what the data identify: the curve parameters of every plant (``individual_parameter``
of the truth, ``scenario_mean + genetic_value + variety_scenario_effect (+ plant_effect)`` in the
model), all together and per curve parameter, and the noise SD. Writes
``docs/benchmarks/nuts_coverage.csv`` (one row per seed and target type) and
``docs/benchmarks/nuts_coverage.md`` (rates with Monte-Carlo errors).

The Monte-Carlo error of a rate is given two ways: binomial (targets independent) and clustered
by seed (SD of the per-seed rates / sqrt(seeds)); the second is the honest one, since the
targets of one data set share their population parameters.

The defaults are the configuration measured on this design (docs/nuts.md): the centred
parametrisation sampled as written (``--no-reparam``) except the kinship genetic values'
eigen-components, sampled non-centred (``--noncentred-sites genetic_value_component``), two
chains of 200 warm-up and 300 kept iterations, one torch thread. The files are rewritten after
every seed, so an interrupted run leaves the table of the seeds done; ``--resume`` continues.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/nuts_coverage.py --seeds 12
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import torch
import xarray as xr

from pyro_nlme.data import load_data
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import PARAMETRIZATIONS, g2was

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
PROBABILITY = 0.9
DIAGNOSTICS = (
    "wall_s",
    "divergences",
    "mean_tree_depth",
    "step_size",
    "max_r_hat",
    "min_ess_bulk",
    "max_r_hat_curves",
    "min_ess_bulk_curves",
)


def curve_parameters(posterior: xr.Dataset) -> xr.DataArray:
    """Posterior draws of every plant's curve parameters
    ``[chain, draw, variety, scenario, plant, curve_parameter]`` (sampled directly in the
    centred form, summed from the effects in the non-centred one)."""
    if "plant_parameter" in posterior:
        phi = posterior["plant_parameter"]
    elif "variety_scenario_parameter" in posterior:
        phi = posterior["variety_scenario_parameter"].expand_dims(plant=[1], axis=-2)
    else:
        phi = _summed_curve_parameters(posterior)
    return phi.transpose("chain", "draw", "variety", "scenario", "plant", "curve_parameter")


def _summed_curve_parameters(posterior: xr.Dataset) -> xr.DataArray:
    phi = (posterior["scenario_mean"] + posterior["genetic_value"]) + posterior.get(
        "variety_scenario_effect", 0.0
    )
    if "plant_effect" in posterior:
        phi = phi + posterior["plant_effect"]
    else:
        phi = phi.expand_dims(plant=[1], axis=-2)
    return phi


def covered(draws: xr.DataArray, truth: np.ndarray) -> np.ndarray:
    """Whether the equal-tailed :data:`PROBABILITY` interval of each scalar covers the truth."""
    tail = (1 - PROBABILITY) / 2
    lower = draws.quantile(tail, dim=("chain", "draw")).values
    upper = draws.quantile(1 - tail, dim=("chain", "draw")).values
    return (lower <= truth) & (truth <= upper)


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    design = DesignConfig(
        n_varieties=args.varieties,
        n_markers=args.markers,
        n_plants=args.plants,
        n_days=args.days,
        n_chromosomes=min(19, args.markers),
    )
    sim = simulate_design(design, seed=seed)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    config = NUTSConfig(
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        init_refine_steps=args.refine_steps,
        reparam=args.reparam,
        noncentred_sites=tuple(args.noncentred_sites),
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    model_kwargs = {"marker_form": "kinship", "parametrization": args.parametrization}
    fit = fit_nuts(g2was, data, config, model_kwargs=model_kwargs)
    wall = time.perf_counter() - start
    posterior = fit.inference_data.posterior
    stats = fit.inference_data.sample_stats
    phi = curve_parameters(posterior)
    truth_phi = sim.truth["individual_parameter"].transpose(
        "variety", "scenario", "plant", "curve_parameter"
    )
    plant_present = data.plant_mask.numpy()[..., None]
    phi_inside = covered(phi, truth_phi.values)  # [variety, scenario, plant, curve_parameter]
    present = np.broadcast_to(plant_present, phi.shape[2:])
    noise_covered = covered(posterior["noise_sd"], np.asarray(sim.truth["noise_sd"]))
    table = fit.population_summary
    phi_draws = xr.Dataset({"phi": phi})
    common = {
        "seed": seed,
        "wall_s": wall,
        "divergences": int(stats["diverging"].sum()),
        "mean_tree_depth": float(stats["tree_depth"].mean()),
        "step_size": float(stats["step_size"].mean()),
        "max_r_hat": float(table["r_hat"].max()),
        "min_ess_bulk": float(table["ess_bulk"].min()),
        "max_r_hat_curves": float(np.nanmax(az.rhat(phi_draws)["phi"].values)),
        "min_ess_bulk_curves": float(np.nanmin(az.ess(phi_draws)["phi"].values)),
    }
    rows = curve_parameter_rows(common, phi_inside, present, phi["curve_parameter"].values)
    return [*rows, {**common, "target": "noise_sd", "n": 1, "covered": int(noise_covered.sum())}]


def curve_parameter_rows(common: dict, inside: np.ndarray, present: np.ndarray, names) -> list:
    """Coverage rows of the plants' curve parameters, all together and per curve parameter
    (``inside`` and ``present`` ``[variety, scenario, plant, curve_parameter]``)."""
    rows = [
        {
            **common,
            "target": "plant curve parameters",
            "n": int(present.sum()),
            "covered": int(inside[present].sum()),
        }
    ]
    for k, name in enumerate(names):
        hits = inside[..., k][present[..., k]]
        rows.append({**common, "target": str(name), "n": hits.size, "covered": int(hits.sum())})
    return rows


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (floats to 4 significant digits), without the ``tabulate`` dependency."""

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Coverage rate per target type with binomial and seed-clustered Monte-Carlo errors."""
    out = []
    for target, group in rows.groupby("target", sort=False):
        n, k = group["n"].sum(), group["covered"].sum()
        rate = k / n
        per_seed = group["covered"] / group["n"]
        out.append(
            {
                "target": target,
                "seeds": len(group),
                "intervals": int(n),
                "coverage": rate,
                "mc_error_binomial": float(np.sqrt(rate * (1 - rate) / n)),
                "mc_error_by_seed": float(per_seed.std(ddof=1) / np.sqrt(len(group)))
                if len(group) > 1
                else float("nan"),
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--varieties", type=int, default=6)
    parser.add_argument("--markers", type=int, default=60)
    parser.add_argument("--plants", type=int, default=1)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--refine-steps", type=int, default=1000, help="init_refine_steps")
    parser.add_argument("--parametrization", choices=PARAMETRIZATIONS, default="centred")
    parser.add_argument(
        "--reparam",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NUTSConfig.reparam: sample the individual latents non-centred",
    )
    parser.add_argument(
        "--noncentred-sites",
        nargs="*",
        default=["genetic_value_component"],
        help="NUTSConfig.noncentred_sites, e.g. genetic_value_component",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds already in docs/benchmarks/nuts_coverage.csv (same settings)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.resume and (OUT / "nuts_coverage.csv").exists():
        rows = pd.read_csv(OUT / "nuts_coverage.csv").to_dict("records")
    done = {row["seed"] for row in rows}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if seed in done:
            continue
        rows += run_seed(seed, args)
        frame = pd.DataFrame(rows)
        frame.to_csv(OUT / "nuts_coverage.csv", index=False)
        report = report_markdown(frame, args)
        (OUT / "nuts_coverage.md").write_text(report)
        first = rows[-5]
        print(
            f"seed {seed}: {first['covered']}/{first['n']} plant parameters ("
            + ", ".join(f"{r['target']} {r['covered']}/{r['n']}" for r in rows[-4:-1])
            + "), "
            f"noise {'in' if rows[-1]['covered'] else 'out'}, {rows[-1]['wall_s']:.0f} s, "
            f"depth {rows[-1]['mean_tree_depth']:.1f}, divergences {rows[-1]['divergences']}, "
            f"r_hat {rows[-1]['max_r_hat']:.3f} / {rows[-1]['max_r_hat_curves']:.3f}",
            flush=True,
        )
    print(report)


def report_markdown(frame: pd.DataFrame, args: argparse.Namespace) -> str:
    """The coverage table of the seeds in ``frame`` with the sampler's diagnostics."""
    per_fit = frame.groupby("seed").first()
    return "\n".join(
        [
            "# NUTS 90% interval coverage on small simulated designs",
            "",
            f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/nuts_coverage.py "
            f"--seeds {args.seeds} --first-seed {args.first_seed} --varieties {args.varieties} "
            f"--markers {args.markers} --plants {args.plants} --days {args.days} "
            f"--chains {args.chains} --warmup {args.warmup} --samples {args.samples} "
            f"--refine-steps {args.refine_steps} --parametrization {args.parametrization} "
            f"--{'' if args.reparam else 'no-'}reparam "
            + (
                f"--noncentred-sites {' '.join(args.noncentred_sites)} "
                if args.noncentred_sites
                else ""
            )
            + f"--threads {args.threads}`",
            "",
            f"g2was in kinship form ({args.parametrization}), {len(per_fit)} seeds; nominal "
            f"{PROBABILITY:.0%} equal-tailed intervals. Divergences over all fits: "
            f"{int(per_fit['divergences'].sum())}; largest r_hat: population "
            f"{per_fit['max_r_hat'].max():.3f}, curve parameters "
            f"{per_fit['max_r_hat_curves'].max():.3f}; smallest bulk ESS: population "
            f"{per_fit['min_ess_bulk'].min():.0f}, curve parameters "
            f"{per_fit['min_ess_bulk_curves'].min():.0f} (of {args.chains * args.samples} "
            f"draws); mean tree depth {per_fit['mean_tree_depth'].mean():.1f}; wall time per "
            f"fit: median {per_fit['wall_s'].median():.0f} s, max {per_fit['wall_s'].max():.0f} s.",
            "",
            markdown_table(summarise(frame)),
            "",
            "Per fit:",
            "",
            markdown_table(per_fit.reset_index()[["seed", *DIAGNOSTICS]]),
            "",
        ]
    )


if __name__ == "__main__":
    main()
