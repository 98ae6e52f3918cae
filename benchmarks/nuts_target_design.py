"""NUTS on the simulated target design, ``g2was`` in kinship form: wall time, ESS per second,
and (once an SVI fit of the same data is given) the agreement with SVI.

The full design is 250 varieties x 3 scenarios x 2 plants x 21 days with 60,000 markers; on a
shared 2-core machine Pyro's NUTS cannot sample it in minutes, so the size is a flag. Writes a
row to ``docs/benchmarks/nuts_target_design.csv`` and the fit to ``--save`` (netCDF) if given.
``--gradient-cost`` only measures what one gradient of the density NUTS samples costs (JIT
compiled, as the sampler runs it), for estimating a run before starting it: a row in
``docs/benchmarks/nuts_gradient_cost.csv``.

Usage::

    python benchmarks/nuts_target_design.py --gradient-cost
    python benchmarks/nuts_target_design.py --varieties 20 --markers 60000 --warmup 150 \\
        --samples 150 --chains 2 [--svi svi_fit.nc]

:func:`compare_with_svi` takes the two InferenceData and gives, per variable, the difference of
posterior means in NUTS posterior SDs and the ratio of posterior SDs (SVI / NUTS).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd

from pyro_nlme.data import load_data
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import PARAMETRIZATIONS, g2was

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
POPULATION = ("scenario_mean", "genetic_sd", "variety_scenario_sd", "plant_sd", "noise_sd")


def compare_with_svi(
    nuts: az.InferenceData,
    svi: az.InferenceData,
    var_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Agreement of an SVI fit with the NUTS reference, per posterior variable.

    For every scalar of a variable: ``z = (mean_svi - mean_nuts) / sd_nuts`` and
    ``ratio = sd_svi / sd_nuts``. Both exports come from the shared exporter, so variables and
    dims match by name.

    :param var_names: variables to compare (default: every variable of the NUTS posterior that
        the SVI posterior also has).
    :returns: one row per variable: ``scalars``, ``mean_abs_z``, ``max_abs_z``,
        ``median_sd_ratio``, ``min_sd_ratio``, ``max_sd_ratio``.
    """
    names = var_names or [n for n in nuts.posterior.data_vars if n in svi.posterior.data_vars]
    rows = []
    for name in names:
        reference, other = nuts.posterior[name], svi.posterior[name]
        mean_nuts = reference.mean(("chain", "draw"))
        sd_nuts = reference.std(("chain", "draw"))
        z = ((other.mean(("chain", "draw")) - mean_nuts) / sd_nuts).values.ravel()
        ratio = (other.std(("chain", "draw")) / sd_nuts).values.ravel()
        rows.append(
            {
                "variable": name,
                "scalars": z.size,
                "mean_abs_z": float(np.nanmean(np.abs(z))),
                "max_abs_z": float(np.nanmax(np.abs(z))),
                "median_sd_ratio": float(np.nanmedian(ratio)),
                "min_sd_ratio": float(np.nanmin(ratio)),
                "max_sd_ratio": float(np.nanmax(ratio)),
            }
        )
    return pd.DataFrame(rows)


def gradient_cost(model, data, repeats: int = 30, **model_kwargs) -> dict[str, float]:
    """Seconds per gradient of the potential energy NUTS integrates (non-centred model, JIT
    compiled as in :class:`~pyro_nlme.infer.nuts.RecordingNUTS`), median of ``repeats``
    evaluations after three warm-up calls, and the number of latent scalars."""
    import torch
    from pyro.infer.mcmc.util import initialize_model

    from pyro_nlme.infer.nuts import non_centred
    from pyro_nlme.infer.nuts_init import init_to_prior_median

    sampled, _ = non_centred(model, data, **model_kwargs)
    params, potential_fn, _, _ = initialize_model(
        sampled,
        model_args=(data,),
        model_kwargs=model_kwargs,
        init_strategy=init_to_prior_median,
        jit_compile=True,
        skip_jit_warnings=True,
    )
    point = {name: value.detach().requires_grad_() for name, value in params.items()}
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        torch.autograd.grad(potential_fn(point), list(point.values()))
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {
        "latent_scalars": int(sum(value.numel() for value in params.values())),
        "s_per_gradient": float(np.median(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--varieties", type=int, default=250)
    parser.add_argument("--markers", type=int, default=60_000)
    parser.add_argument("--plants", type=int, default=2)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--max-tree-depth", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parametrization", choices=PARAMETRIZATIONS, default="noncentred")
    parser.add_argument(
        "--reparam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NUTSConfig.reparam: sample the individual latents non-centred",
    )
    parser.add_argument("--save", type=Path, default=None, help="netCDF of the NUTS fit")
    parser.add_argument("--svi", type=Path, default=None, help="netCDF of an SVI fit")
    parser.add_argument(
        "--gradient-cost", action="store_true", help="only time a gradient of the density"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    sim = simulate_design(
        DesignConfig(
            n_varieties=args.varieties,
            n_markers=args.markers,
            n_plants=args.plants,
            n_days=args.days,
        ),
        seed=args.seed,
    )
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    prepare_s = time.perf_counter() - start
    if args.gradient_cost:
        start = time.perf_counter()
        cost = gradient_cost(g2was, data, marker_form="kinship")
        row = {
            "varieties": args.varieties,
            "markers": args.markers,
            "plants": args.plants,
            "days": args.days,
            "observations": int(data.mask.sum()),
            **cost,
            "setup_and_timing_s": time.perf_counter() - start,
            "simulate_and_load_s": prepare_s,
        }
        _append(OUT / "nuts_gradient_cost.csv", row)
        print(pd.Series(row).to_string())
        return
    config = NUTSConfig(
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        max_tree_depth=args.max_tree_depth,
        reparam=args.reparam,
        seed=args.seed,
        progress=False,
    )
    start = time.perf_counter()
    model_kwargs = {"marker_form": "kinship", "parametrization": args.parametrization}
    fit = fit_nuts(g2was, data, config, model_kwargs=model_kwargs)
    wall = time.perf_counter() - start
    idata = fit.inference_data
    if args.save:
        idata.to_netcdf(str(args.save))
    population = [n for n in POPULATION if n in idata.posterior]
    ess_population = az.ess(idata, var_names=population)
    ess_genetic = az.ess(idata, var_names=["genetic_value"])["genetic_value"].values
    population_ess = np.concatenate([ess_population[n].values.ravel() for n in population])
    sampling_s = float(fit.history["wall_s"].sum())
    stats = idata.sample_stats
    row = {
        "varieties": args.varieties,
        "markers": args.markers,
        "plants": args.plants,
        "days": args.days,
        "observations": int(data.mask.sum()),
        "latent_dims": int(
            sum(
                np.prod(idata.posterior[n].shape[2:])
                for n in fit.inference_data.posterior
                if n not in ("curve", "genetic_value")
            )
        ),
        "parametrization": args.parametrization,
        "reparam": args.reparam,
        "chains": args.chains,
        "warmup": args.warmup,
        "samples": args.samples,
        "simulate_and_load_s": prepare_s,
        "fit_wall_s": wall,
        "sampler_wall_s": sampling_s,
        "leapfrog_steps": int(
            fit.history["warmup_leapfrog_steps"].sum()
            + fit.history["sampling_leapfrog_steps"].sum()
        ),
        "ms_per_leapfrog": 1e3
        * sampling_s
        / max(
            1,
            int(
                fit.history["warmup_leapfrog_steps"].sum()
                + fit.history["sampling_leapfrog_steps"].sum()
            ),
        ),
        "mean_tree_depth": float(stats["tree_depth"].mean()),
        "step_size": float(stats["step_size"].mean()),
        "divergences": int(stats["diverging"].sum()),
        "max_r_hat_population": float(fit.population_summary["r_hat"].max()),
        "min_ess_bulk_population": float(population_ess.min()),
        "min_ess_per_s_population": float(population_ess.min() / wall),
        "median_ess_per_s_population": float(np.median(population_ess) / wall),
        "median_ess_per_s_genetic_value": float(np.median(ess_genetic) / wall),
    }
    _append(OUT / "nuts_target_design.csv", row)
    print(fit.report())
    print(pd.Series(row).to_string())
    if args.svi:
        print(compare_with_svi(idata, az.from_netcdf(str(args.svi))).to_string(index=False))


def _append(csv: Path, row: dict) -> None:
    csv.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([row])
    if csv.exists():
        frame = pd.concat([pd.read_csv(csv), frame], ignore_index=True)
    frame.to_csv(csv, index=False)


if __name__ == "__main__":
    main()
