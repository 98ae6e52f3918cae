"""NUTS on the simulated target design, ``g2was`` in kinship form: wall time, ESS per second,
and the agreement with an SVI fit of the same data.

The full design is 250 varieties x 3 scenarios x 2 plants x 21 days with 60,000 markers (7,519
latent scalars in kinship form). The defaults are the configuration measured on small designs
(docs/nuts.md, ``benchmarks/nuts_coverage.py``): the centred parametrisation sampled as written
(``--no-reparam``) except the kinship genetic values' eigen-components, sampled non-centred
(``--noncentred-sites genetic_value_component``), the Laplace start refined by 1,000 SVI steps,
one torch thread. The mass matrix is diagonal: ``fit_nuts`` adapts a dense one only up to
:data:`~pyro_nlme.infer.nuts.DENSE_MASS_MAX_DIM` latent scalars, and at 7,519 a dense metric
costs 57 million multiply-adds per leapfrog step and a dense Hessian for the Laplace start.

Chain ``c`` is ``fit_nuts`` with one chain and seed ``seed + c`` (its own Laplace start and
warm-up); each chain is written to ``<--save>.chain<c>.nc`` as soon as it ends, and
``--resume`` reuses the chains already written, so an interrupted run keeps its finished chains.

Writes a row to ``docs/benchmarks/<--out>.csv``; with ``--svi`` (netCDF of an SVI fit of the
same data, e.g. from ``--fit-svi``) also ``docs/benchmarks/<--out>.md`` (``--out`` defaults to
``nuts_target_design``; ``nuts_small_design`` holds a 60-variety run):
per population scalar, the difference of the SVI and NUTS posterior means in NUTS posterior SDs
and the ratio of posterior SDs, beside the sampler's diagnostics. ESS per second divides by the
whole fits' wall time (Laplace start, warm-up, draws and export of every chain).
``--fit-svi PATH`` fits SVI on the same simulated data with the README's recommended settings
and writes it to PATH. ``--gradient-cost`` only measures what one gradient of the density NUTS
samples costs (JIT compiled, as the sampler runs it): a row in
``docs/benchmarks/nuts_gradient_cost.csv``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/nuts_target_design.py --gradient-cost
    OMP_NUM_THREADS=1 python benchmarks/nuts_target_design.py --fit-svi /tmp/svi.nc
    OMP_NUM_THREADS=1 python benchmarks/nuts_target_design.py --chains 2 --warmup 150 \\
        --samples 150 --save /tmp/nuts --resume --svi /tmp/svi.nc
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import torch
import xarray as xr

from pyro_nlme.data import NLMEData, load_data
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts, non_centred, reparametrised
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import PARAMETRIZATIONS, g2was

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
POPULATION = ("scenario_mean", "genetic_sd", "variety_scenario_sd", "plant_sd", "noise_sd")
SVI_SETTINGS = {
    "guide": "amortized",
    "lr": 0.02,
    "lr_decay_steps": 2500,
    "max_steps": 7500,
}


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
        z, ratio = _z_and_ratio(nuts, svi, name)
        z, ratio = z.values.ravel(), ratio.values.ravel()
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


def compare_scalars(
    nuts: az.InferenceData,
    svi: az.InferenceData,
    var_names: Sequence[str],
    truth: xr.Dataset | None = None,
) -> pd.DataFrame:
    """:func:`compare_with_svi` for every scalar of ``var_names``: one row per scalar with its
    coordinates (``variable[coord, ...]``), both posterior means and SDs, ``z`` and
    ``sd_ratio``; with the simulator's ``truth``, also the true value and each engine's
    ``(mean - truth) / sd`` (``z_truth_nuts``, ``z_truth_svi``)."""
    rows = []
    for name in var_names:
        z, ratio = _z_and_ratio(nuts, svi, name)
        mean_nuts, sd_nuts = _moments(nuts.posterior[name])
        mean_svi, sd_svi = _moments(svi.posterior[name])
        true = None
        if truth is not None and name in truth:
            true = truth[name].transpose(*z.dims).values
        for index in np.ndindex(z.shape):
            coords = ", ".join(str(z[dim].values[i]) for dim, i in zip(z.dims, index, strict=True))
            row = {
                "scalar": f"{name}[{coords}]" if coords else name,
                "mean_nuts": float(mean_nuts.values[index]),
                "sd_nuts": float(sd_nuts.values[index]),
                "mean_svi": float(mean_svi.values[index]),
                "sd_svi": float(sd_svi.values[index]),
                "z": float(z.values[index]),
                "sd_ratio": float(ratio.values[index]),
            }
            if true is not None:
                row["truth"] = float(true[index])
                row["z_truth_nuts"] = (row["mean_nuts"] - row["truth"]) / row["sd_nuts"]
                row["z_truth_svi"] = (row["mean_svi"] - row["truth"]) / row["sd_svi"]
            rows.append(row)
    return pd.DataFrame(rows)


def _moments(draws):
    return draws.mean(("chain", "draw")), draws.std(("chain", "draw"))


def _z_and_ratio(nuts: az.InferenceData, svi: az.InferenceData, name: str):
    mean_nuts, sd_nuts = _moments(nuts.posterior[name])
    mean_svi, sd_svi = _moments(svi.posterior[name])
    return (mean_svi - mean_nuts) / sd_nuts, sd_svi / sd_nuts


def gradient_cost(
    model, data: NLMEData, sites: Sequence[str], repeats: int = 30, **model_kwargs
) -> dict[str, float]:
    """Seconds per gradient of the potential energy NUTS integrates (``model`` with ``sites``
    sampled non-centred, JIT compiled as in :class:`~pyro_nlme.infer.nuts.RecordingNUTS`),
    median of ``repeats`` evaluations after three warm-up calls, and the number of latent
    scalars."""
    from pyro.infer.mcmc.util import initialize_model

    from pyro_nlme.infer.nuts_init import init_to_prior_median

    with torch.device(data.device):  # as fit_nuts: a prior's float constants on data's device
        params, potential_fn, _, _ = initialize_model(
            reparametrised(model, list(sites)),
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
            if data.device.type == "cuda":
                torch.cuda.synchronize(data.device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return {
        "latent_scalars": int(sum(value.numel() for value in params.values())),
        "s_per_gradient": float(np.median(times)),
    }


def fit_chains(
    data: NLMEData, config: NUTSConfig, model_kwargs: dict, save: Path | None, resume: bool
) -> tuple[az.InferenceData, pd.DataFrame]:
    """``config.chains`` chains, chain ``c`` a one-chain :func:`fit_nuts` seeded
    ``config.seed + c``, written to ``<save>.chain<c>.nc`` when it ends (and read back from
    there with ``resume``); the chains joined along ``chain`` and one history row per chain
    (``wall_s``: the sampler's run, warm-up and draws; ``fit_wall_s``: the whole ``fit_nuts``
    call, Laplace start and export included; a resumed chain's are those it was run with)."""
    fits, history = [], []
    for chain in range(config.chains):
        path = None if save is None else save.with_name(f"{save.name}.chain{chain}.nc")
        if resume and path is not None and path.exists():
            idata = az.from_netcdf(str(path))
            timing = pd.read_csv(path.with_suffix(".csv"))
        else:
            one = NUTSConfig(**{**vars(config), "chains": 1, "seed": config.seed + chain})
            start = time.perf_counter()
            fit = fit_nuts(g2was, data, one, model_kwargs=model_kwargs)
            idata = fit.inference_data
            timing = fit.history.assign(chain=chain, fit_wall_s=time.perf_counter() - start)
            print(timing.to_string(index=False), flush=True)
            if path is not None:
                idata.to_netcdf(str(path))
                timing.to_csv(path.with_suffix(".csv"), index=False)
        fits.append(idata.assign_coords(chain=[chain], groups=["posterior", "sample_stats"]))
        history.append(timing)
    joined = fits[0] if len(fits) == 1 else az.concat(*fits, dim="chain")
    return joined, pd.concat(history, ignore_index=True)


def fit_svi_reference(data: NLMEData, model_kwargs: dict, seed: int) -> az.InferenceData:
    """SVI with the README's recommended settings (:data:`SVI_SETTINGS`, the kinship genetic
    values' eigen-components non-centred, minibatches of 64 varieties) on ``data``."""
    from pyro_nlme.infer.svi import SVIConfig, fit_svi

    config = SVIConfig(
        **SVI_SETTINGS,
        noncentred_sites=("genetic_value_component",),
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    result = fit_svi(g2was, data, config, model_kwargs=model_kwargs)
    print(f"SVI: {time.perf_counter() - start:.0f} s, {len(result.history)} history rows")
    return result.inference_data


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
    parser.add_argument("--refine-steps", type=int, default=1000, help="init_refine_steps")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed; chain c: seed + c")
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
        "--save", type=Path, default=None, help="prefix of the per-chain netCDF files"
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse the chains already written to --save"
    )
    parser.add_argument("--progress", action="store_true", help="Pyro's progress bar")
    parser.add_argument("--svi", type=Path, default=None, help="netCDF of an SVI fit")
    parser.add_argument(
        "--fit-svi", type=Path, default=None, help="only fit SVI and write it to this netCDF"
    )
    parser.add_argument(
        "--gradient-cost", action="store_true", help="only time a gradient of the density"
    )
    parser.add_argument(
        "--out",
        default="nuts_target_design",
        help="stem of the table files written to docs/benchmarks",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    design = {
        "varieties": args.varieties,
        "markers": args.markers,
        "plants": args.plants,
        "days": args.days,
    }
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
    model_kwargs = {"marker_form": "kinship", "parametrization": args.parametrization}
    if args.fit_svi:
        fit_svi_reference(data, model_kwargs, args.seed).to_netcdf(str(args.fit_svi))
        return
    if args.gradient_cost:
        start = time.perf_counter()
        sites = [
            name
            for name in non_centred(g2was, data, tuple(args.noncentred_sites), **model_kwargs)[1]
            if args.reparam or name in args.noncentred_sites
        ]
        cost = gradient_cost(g2was, data, sites, **model_kwargs)
        row = {
            **design,
            "observations": int(data.mask.sum()),
            **cost,
            "setup_and_timing_s": time.perf_counter() - start,
            "simulate_and_load_s": prepare_s,
            "parametrization": args.parametrization,
            "noncentred": " ".join(sites),
            "threads": args.threads,
        }
        _append(OUT / "nuts_gradient_cost.csv", row)
        print(pd.Series(row).to_string())
        return
    config = NUTSConfig(
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        max_tree_depth=args.max_tree_depth,
        init_refine_steps=args.refine_steps,
        reparam=args.reparam,
        noncentred_sites=tuple(args.noncentred_sites),
        seed=args.seed,
        progress=args.progress,
    )
    idata, history = fit_chains(data, config, model_kwargs, args.save, args.resume)
    wall = float(history["fit_wall_s"].sum())
    population = [n for n in POPULATION if n in idata.posterior]
    table = az.summary(idata, var_names=population, kind="diagnostics", round_to="none")
    ess_genetic = az.ess(idata, var_names=["genetic_value"])["genetic_value"].values
    stats = idata.sample_stats
    leapfrog = int(
        history["warmup_leapfrog_steps"].sum() + history["sampling_leapfrog_steps"].sum()
    )
    row = {
        **design,
        "observations": int(data.mask.sum()),
        "parametrization": args.parametrization,
        "reparam": args.reparam,
        "noncentred_sites": " ".join(args.noncentred_sites),
        "refine_steps": args.refine_steps,
        "threads": args.threads,
        "chains": args.chains,
        "warmup": args.warmup,
        "samples": args.samples,
        "simulate_and_load_s": prepare_s,
        "fit_wall_s": wall,
        "sampler_wall_s": float(history["wall_s"].sum()),
        "leapfrog_steps": leapfrog,
        "ms_per_leapfrog": 1e3 * float(history["wall_s"].sum()) / max(1, leapfrog),
        "mean_tree_depth": float(stats["tree_depth"].mean()),
        "max_tree_depth_hits": int((stats["tree_depth"] >= args.max_tree_depth).sum()),
        "step_size": float(stats["step_size"].mean()),
        "divergences": int(stats["diverging"].sum()),
        "max_r_hat_population": float(table["r_hat"].max()),
        "min_ess_bulk_population": float(table["ess_bulk"].min()),
        "min_ess_tail_population": float(table["ess_tail"].min()),
        "min_ess_bulk_per_s_population": float(table["ess_bulk"].min() / wall),
        "median_ess_bulk_per_s_population": float(table["ess_bulk"].median() / wall),
        "min_ess_tail_per_s_population": float(table["ess_tail"].min() / wall),
        "median_ess_bulk_per_s_genetic_value": float(np.median(ess_genetic) / wall),
    }
    _append(OUT / f"{args.out}.csv", row)
    print(history.to_string(index=False))
    print(table.to_string())
    print(pd.Series(row).to_string())
    if args.svi:
        svi = az.from_netcdf(str(args.svi))
        scalars = compare_scalars(idata, svi, population, sim.truth).set_index("scalar")
        scalars = scalars.join(table[["ess_bulk", "ess_tail", "r_hat"]])
        variables = compare_with_svi(idata, svi)
        print(scalars.to_string())
        print(variables.to_string(index=False))
        _write_markdown(OUT / f"{args.out}.md", args, row, history, scalars, variables)


def _write_markdown(path: Path, args, row: dict, history, scalars, variables) -> None:
    command = (
        f"OMP_NUM_THREADS={args.threads} python benchmarks/nuts_target_design.py "
        f"--varieties {args.varieties} --markers {args.markers} --plants {args.plants} "
        f"--days {args.days} --chains {args.chains} --warmup {args.warmup} "
        f"--samples {args.samples} --refine-steps {args.refine_steps} --seed {args.seed} "
        f"--parametrization {args.parametrization} "
        + ("--reparam " if args.reparam else "--no-reparam ")
        + (
            f"--noncentred-sites {' '.join(args.noncentred_sites)} "
            if args.noncentred_sites
            else ""
        )
        + f"--threads {args.threads} --save PREFIX --svi {args.svi.name} --out {args.out}"
    )
    lines = [
        f"# NUTS on a simulated design ({args.varieties} varieties, {args.markers} markers), "
        "and SVI against it",
        "",
        f"Command: `{command}` (the SVI fit: the same command with `--fit-svi {args.svi.name}` "
        f"instead of the NUTS options: {SVI_SETTINGS}, noncentred_sites genetic_value_component, "
        "batch size 64, seed as --seed).",
        "",
        "## NUTS run",
        "",
        _markdown(pd.Series(row).to_frame("value").reset_index(names="quantity")),
        "",
        "Per chain:",
        "",
        _markdown(history),
        "",
        "## SVI against NUTS, population scalars",
        "",
        "`z = (mean_svi - mean_nuts) / sd_nuts`; `sd_ratio = sd_svi / sd_nuts`; `truth`: the "
        "simulator's value, `z_truth_* = (mean - truth) / sd` of each engine; ESS and R-hat of "
        "the NUTS draws.",
        "",
        _markdown(scalars.reset_index()),
        "",
        "## SVI against NUTS, per variable",
        "",
        _markdown(variables),
        "",
    ]
    path.write_text("\n".join(lines))


def _markdown(frame: pd.DataFrame) -> str:
    """A markdown table of ``frame`` (numbers to 4 significant digits)."""

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [list(frame.columns), ["---"] * frame.shape[1]]
    rows += [[cell(v) for v in record] for record in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def _append(csv: Path, row: dict) -> None:
    csv.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([row])
    if csv.exists():
        frame = pd.concat([pd.read_csv(csv), frame], ignore_index=True)
    frame.to_csv(csv, index=False)


if __name__ == "__main__":
    main()
