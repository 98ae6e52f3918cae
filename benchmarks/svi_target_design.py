"""SVI on the full simulated target design: wall time, steps/s, peak memory, recovery of the
curves and scenario means, and genomic prediction of held-out varieties from markers, beside
the mean-field guide and a two-stage ridge (GBLUP) baseline.

Each fit runs in its own process (peak memory per fit). Writes a markdown table and a CSV.

    python benchmarks/svi_target_design.py --runs 3 --out docs/svi_benchmark.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.optimize
import torch

from pyro_nlme.data import GenotypeMatrix, load_data
from pyro_nlme.export import package_versions
from pyro_nlme.infer.stopping import PlateauRule
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import PARAMETRIZATIONS, g2was

PARAMETERS = ("log_asymptote", "log_rate", "inflection")
NOTES_HEADING = "## Notes (by hand; a rerun replaces everything above, not these notes)"
SUMMARY_SITES = ("scenario_mean", "genetic_sd", "variety_scenario_sd", "plant_sd", "noise_sd")


def simulated(n_varieties: int, n_heldout: int, n_markers: int, seed: int):
    config = DesignConfig(n_varieties=n_varieties, n_heldout=n_heldout, n_markers=n_markers)
    sim = simulate_design(config, seed=seed)
    heldout = sim.truth["heldout"].values
    genotypes = sim.genotype_table()
    data = load_data(sim.phenotypes, markers=genotypes[~heldout])
    return sim, data, genotypes[heldout]


def heldout_markers(data, new_genotypes) -> GenotypeMatrix:
    """The held-out varieties' genotypes, standardised with the training moments."""
    new = torch.as_tensor(new_genotypes.iloc[:, 1:].to_numpy(np.int8))
    markers = data.markers
    return GenotypeMatrix(
        new, markers.marker_ids, markers.mean, markers.scale, markers.monomorphic, 0
    )


def heldout_genetic_values(data, new_genotypes, marker_effect: np.ndarray) -> np.ndarray:
    """Z_new (standardised with the training moments) @ marker effects: ``[V_new, K]``."""
    effect = torch.as_tensor(marker_effect, dtype=torch.float32)
    return heldout_markers(data, new_genotypes).standardized_matmul(effect).numpy()


def correlations(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        f"r_{name}": float(np.corrcoef(predicted[:, k], truth[:, k])[0, 1])
        for k, name in enumerate(PARAMETERS)
    }


def one_fit(args) -> dict:
    """One SVI fit and its metrics (run in a child process)."""
    sim, data, new = simulated(args.varieties, args.heldout, args.markers, args.data_seed)
    config = SVIConfig(
        guide=args.guide,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        stopping=PlateauRule(min_steps=args.min_steps),
        lr=args.lr,
        lr_decay_steps=args.lr_decay_steps,
        noncentred_sites=tuple(args.noncentred_sites),
        correlated_events=args.correlated_events,
        correlated_plates=tuple(args.correlated_plates),
        exact_levels=tuple(args.exact_levels),
        variety_offsets=args.variety_offsets,
        seed=args.seed,
        progress=False,
        num_draws=args.draws,
        device=args.device,
    )
    started = time.perf_counter()
    model_kwargs = {"marker_form": args.marker_form, "parametrization": args.parametrization}
    result = fit_svi(g2was, data, config, model_kwargs=model_kwargs)
    wall = time.perf_counter() - started
    posterior = result.inference_data.posterior
    truth = sim.truth
    curve = posterior["curve"].mean(("chain", "draw")).values
    true_curve = truth["noise_free_curve"].sel(variety=data.variety_ids).values
    present = data.plant_mask.numpy()
    fitted, target = curve[present], true_curve[present]
    r2 = 1 - ((fitted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    means = posterior["scenario_mean"]
    low, high = means.quantile([0.05, 0.95], ("chain", "draw")).values
    true_means = truth["scenario_mean"].values
    covered = (low <= true_means) & (true_means <= high)
    z = (means.mean(("chain", "draw")).values - true_means) / means.std(("chain", "draw")).values
    effect = posterior["marker_effect"].mean(("chain", "draw")).values
    predicted = heldout_genetic_values(data, new, effect)
    heldout_truth = truth["genetic_value"].sel(variety=list(new["variety"])).values
    return {
        "guide": args.guide,
        "seed": args.seed,
        "wall_s": wall,
        "steps": len(result.history),
        "stopped_by": "plateau" if len(result.history) < args.max_steps else "budget",
        "steps_per_s": len(result.history) / result.history["seconds"].iloc[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated(args.device) / 2**20
        if args.device.startswith("cuda")
        else None,
        "curve_r2": float(r2),
        "scenario_mean_coverage_90": float(covered.mean()),
        "scenario_means_covered": f"{int(covered.sum())}/{covered.size}",
        "scenario_mean_max_abs_z": float(np.abs(z).max()),
        **{
            f"genetic_sd_{name}": float(posterior["genetic_sd"].mean(("chain", "draw"))[k])
            for k, name in enumerate(PARAMETERS)
        },
        "noise_sd": float(posterior["noise_sd"].mean()),
        **correlations(predicted, heldout_truth),
        "population": {
            name: {
                "mean": posterior[name].mean(("chain", "draw")).values.ravel().tolist(),
                "sd": posterior[name].std(("chain", "draw")).values.ravel().tolist(),
            }
            for name in SUMMARY_SITES
        },
    }


def max_shift(run: dict, reference: dict) -> tuple[float, str]:
    """Largest difference of a population posterior mean between ``run`` and the longer
    ``reference`` fit, in the reference's posterior SDs (0: the extra steps changed nothing),
    and the scalar where it is (``site[flat index]``)."""
    shifts = [
        (abs(a - b) / sd, f"{name}[{i}]")
        for name in SUMMARY_SITES
        for i, (a, b, sd) in enumerate(
            zip(
                run["population"][name]["mean"],
                reference["population"][name]["mean"],
                reference["population"][name]["sd"],
                strict=True,
            )
        )
    ]
    shift, where = max(shifts)
    return float(shift), where


def _log_logistic(t, log_asymptote, log_rate, inflection):
    return log_asymptote + np.log(scipy.special.expit(np.exp(log_rate) * (t - inflection)))


def two_stage_ridge(sim, data, new) -> dict:
    """Stage 1: least-squares logistic fit (log scale) per variety x scenario, centred per
    scenario and averaged over scenarios. Stage 2: kernel ridge on standardised markers with
    the penalty chosen by exact leave-one-out error; predict the held-out varieties."""
    phenotypes = sim.phenotypes.dropna(subset=["value"])
    phenotypes = phenotypes[phenotypes["value"] > 0]
    estimates = np.full((data.n_varieties, data.n_scenarios, 3), np.nan)
    position = {v: i for i, v in enumerate(data.variety_ids)}
    scenario = {s: i for i, s in enumerate(data.scenario_names)}
    start = (np.log(phenotypes["value"].max()), np.log(0.3), 10.0)
    for (variety, name), rows in phenotypes.groupby(["variety", "scenario"]):
        t, y = rows["time"].to_numpy(), np.log(rows["value"].to_numpy())
        fit = scipy.optimize.least_squares(
            lambda p, t=t, y=y: _log_logistic(t, *p) - y, start, method="lm"
        )
        estimates[position[variety], scenario[name]] = fit.x
    centred = estimates - np.nanmean(estimates, axis=0, keepdims=True)
    per_variety = np.nanmean(centred, axis=1)
    z = data.markers.standardized().double().numpy()
    kernel = z @ z.T / z.shape[1]
    eigenvalues, eigenvectors = np.linalg.eigh(kernel)
    best = None
    for penalty in np.logspace(-6, 3, 37):
        hat = eigenvectors @ np.diag(eigenvalues / (eigenvalues + penalty)) @ eigenvectors.T
        residual = (per_variety - hat @ per_variety) / (1 - np.diag(hat))[:, None]
        loo = float((residual**2).sum())
        if best is None or loo < best[0]:
            best = (loo, penalty)
    penalty = best[1]
    alpha = np.linalg.solve(kernel + penalty * np.eye(len(kernel)), per_variety)
    new_z = heldout_markers(data, new).standardized().double().numpy()
    predicted = new_z @ z.T / z.shape[1] @ alpha
    heldout_truth = sim.truth["genetic_value"].sel(variety=list(new["variety"])).values
    return {
        "guide": "two-stage ridge",
        "ridge_penalty": penalty,
        **correlations(predicted, heldout_truth),
    }


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table (without the optional ``tabulate`` dependency of ``DataFrame.to_markdown``)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--varieties", type=int, default=250)
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--markers", type=int, default=60_000)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="amortised fits (seeds 0..runs-1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument(
        "--min-steps",
        type=int,
        default=PlateauRule.min_steps,
        help="no stop on the ELBO plateau before this many steps",
    )
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=0,
        help="also fit seed 0 with this many steps; report each run's largest shift from it",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--lr-decay-steps",
        type=int,
        default=None,
        help="SVIConfig.lr_decay_steps of the runs (default: their budget); the reference run "
        "decays over half its budget",
    )
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--marker-form", choices=["effects", "kinship"], default="kinship")
    parser.add_argument("--parametrization", choices=PARAMETRIZATIONS, default="centred")
    parser.add_argument(
        "--noncentred-sites", nargs="*", default=["genetic_value_component"], metavar="SITE"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument(
        "--correlated-events", action="store_true", help="amortised guide (docs/svi.md)"
    )
    parser.add_argument("--correlated-plates", nargs="*", default=[])
    parser.add_argument("--exact-levels", nargs="*", default=[])
    parser.add_argument(
        "--variety-offsets", action="store_true", help="amortised guide (docs/svi.md)"
    )
    parser.add_argument("--out", default="docs/svi_benchmark.md")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guide", default="amortized", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(one_fit(args)))
        return
    common = [
        "--varieties",
        str(args.varieties),
        "--heldout",
        str(args.heldout),
        "--markers",
        str(args.markers),
        "--data-seed",
        str(args.data_seed),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--min-steps",
        str(args.min_steps),
        "--draws",
        str(args.draws),
        "--marker-form",
        args.marker_form,
        "--parametrization",
        args.parametrization,
        "--device",
        args.device,
        "--noncentred-sites",
        *args.noncentred_sites,
        "--correlated-plates",
        *args.correlated_plates,
        "--exact-levels",
        *args.exact_levels,
    ]
    common += ["--correlated-events"] if args.correlated_events else []
    common += ["--variety-offsets"] if args.variety_offsets else []
    decay = args.lr_decay_steps or args.max_steps
    runs = [("amortized", seed, args.max_steps, decay) for seed in range(args.runs)] + [
        ("normal", 0, args.max_steps, decay)
    ]
    if args.reference_steps:
        runs.append(("amortized", 0, args.reference_steps, args.reference_steps // 2))
    rows = []
    for guide, seed, steps, decay_steps in runs:
        command = [sys.executable, __file__, "--single", "--guide", guide, "--seed", str(seed)]
        options = [*common, "--max-steps", str(steps), "--lr-decay-steps", str(decay_steps)]
        output = subprocess.run(command + options, check=True, capture_output=True, text=True)
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
        print({k: v for k, v in rows[-1].items() if k != "population"}, flush=True)
    if args.reference_steps:
        rows[-1]["guide"] = f"amortized, {args.reference_steps} steps (reference)"
        for row in rows[:-1]:
            shift, where = max_shift(row, rows[-1])
            row["max_shift_vs_reference_sd"], row["max_shift_at"] = shift, where
    for row in rows:
        del row["population"]
    sim, data, new = simulated(args.varieties, args.heldout, args.markers, args.data_seed)
    rows.append(two_stage_ridge(sim, data, new))
    table = pd.DataFrame(rows)
    out = Path(args.out)
    table.to_csv(out.with_suffix(".csv"), index=False)
    amortized = table[table["guide"] == "amortized"]
    lines = [
        "# SVI on the simulated target design",
        "",
        f"Command: `python benchmarks/svi_target_design.py {' '.join(sys.argv[1:])}`",
        "",
        f"Design: {args.varieties} varieties x 3 scenarios x 2 plants x 21 days, "
        f"{args.markers} markers, {args.heldout} held-out varieties (markers only); "
        f"{args.marker_form} form, {args.parametrization}, non-centred: "
        f"{', '.join(args.noncentred_sites) or 'none'}; amortised guide's individual level: "
        + (
            "correlated events" + "".join(f" over {name}" for name in args.correlated_plates)
            if args.correlated_events
            else "diagonal"
        )
        + "".join(f", {name} exact" for name in args.exact_levels)
        + (", variety offsets" if args.variety_offsets else "")
        + f"; batch {args.batch_size}, "
        f"lr {args.lr} decaying to {SVIConfig().lr_final} over {decay} steps, "
        f"at most {args.max_steps} steps"
        + (
            f" (reference: {args.reference_steps}, decaying over {args.reference_steps // 2})."
            if args.reference_steps
            else "."
        ),
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, device {args.device}; versions: {json.dumps(package_versions())}",
        "",
        f"Amortised guide, median of {len(amortized)} runs: wall "
        f"{amortized['wall_s'].median():.0f} s, {amortized['steps_per_s'].median():.1f} "
        f"steps/s, peak RSS {amortized['peak_rss_mb'].median():.0f} MB.",
        "",
        markdown_table(table),
        "",
        "r_*: correlation between predicted and true genetic values of the held-out "
        "varieties, per curve parameter. curve_r2: posterior mean curves of the fitted "
        "variety x scenario x plant combinations against the true noise-free curves. "
        "scenario_mean_coverage_90: share of the 9 scenario means inside their 90% "
        "posterior intervals. Truth: genetic SDs 0.25, 0.15, 1.0; noise SD 0.08. "
        "max_shift_vs_reference_sd: largest change of a population posterior mean (scenario "
        "means, SDs, noise) between the run and the longer reference run of seed 0, in the "
        "reference's posterior SDs (max_shift_at: which one; flat index over scenario x "
        "curve parameter for scenario_mean).",
    ]
    notes = out.read_text().partition(NOTES_HEADING)[2] if out.exists() else ""
    if notes:
        lines += ["", NOTES_HEADING + notes.rstrip("\n")]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
