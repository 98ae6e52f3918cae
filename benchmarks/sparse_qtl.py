"""Sparse-QTL benchmark: do the sparse marker priors of g2was find 10 true QTL among 60,000
markers, and how well do the priors (and the neural covariate model) predict the genetic values
of varieties never phenotyped?

For each seed: simulate the sparse-QTL design (``DesignConfig(sparse_qtl=True)``: 10 QTL per
curve parameter, 3 of them shared by the three parameters, equal magnitudes, an exact share of
the genetic variance), fit g2was (centred) by mean-field SVI once per marker prior, the
effects of the priors ``--cavi-priors`` (the spike-and-slab ones by default) by coordinate
ascent (``--marker-updates``), the others by Adam, on the phenotyped
varieties (the held-out ones are in the data with genotypes only, so the export holds their
predictions), and score:

- ``power_exact``: fraction of a parameter's 10 QTL among its 50 top-ranked markers (rank: the
  posterior inclusion probability, to 3 decimals, for the spike-and-slab, ties broken by the
  absolute posterior mean effect; the absolute posterior mean effect otherwise: the guide's
  exact mean where the fit exports one, ``guide_mean``, else the mean of the draws);
- ``power_ld``: fraction of its QTL with a top-50 marker within ``--ld-window`` markers on the
  same chromosome;
- ``false_top50``: top-50 markers not within ``--ld-window`` markers of any QTL of the parameter;
- ``r_heldout``: correlation of predicted and true genetic values of the held-out varieties;
- ``gsd_ratio``: SD over the phenotyped varieties of the predicted genetic values divided by the
  true one (a collapse of the genetic variance shows as a ratio near 0).

Three pseudo-priors fit no curve; they rank the markers from the simulator's truth over the
phenotyped varieties, to tell how far the design itself separates the QTL from the other
markers:

- ``oracle_scan``: the absolute correlation of each marker's dosages with the *true* genetic
  values, a single-marker scan of a noise-free phenotype (the other QTL, the polygenic
  background and linkage stand in its way);
- ``oracle_ard_genetic``: a multi-locus fit of the same true genetic values, sparse Bayesian
  learning (:func:`sparse_bayesian_learning`), with the polygenic background as the noise;
- ``oracle_ard_curves``: the same fit of the variety means over scenarios and plants of the
  plants' *true* curve parameters, less the scenario means: perfect curve fits, with the
  variety x scenario and plant deviations in the noise as well (:func:`oracle_response`).
  The phenotype a joint model of the curves sees, at best.

Writes a Markdown table (with the settings) and a CSV beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from svi_target_design import markdown_table  # benchmarks/ is on the path of its scripts

from pyro_nlme.data import load_data
from pyro_nlme.export.inference_data import GUIDE_MEAN, package_versions
from pyro_nlme.infer.guides.gaussian_regression import (
    GaussianRegressionPosterior,
    single_effect_log_evidence,
)
from pyro_nlme.infer.svi import MARKER_UPDATES, SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import CURVE_PARAMETERS, PARAMETRIZATIONS, g2was

TOP = 50
ORACLE_SCAN = "oracle_scan"
ORACLE_ARD = {"oracle_ard_genetic": "genetic", "oracle_ard_curves": "curves"}


def ld_hits(candidates: np.ndarray, targets: np.ndarray, chromosome, position, window: int):
    """bool ``[len(candidates)]``: a candidate within ``window`` markers of some target."""
    same = chromosome[candidates][:, None] == chromosome[targets][None, :]
    near = np.abs(position[candidates][:, None] - position[targets][None, :]) <= window
    return (same & near).any(1)


def oracle_scan(dataset, data) -> np.ndarray:
    """``[M, K]`` absolute correlations of each marker's dosages with the true genetic values
    of each curve parameter over the phenotyped varieties (module docstring)."""
    phenotyped = ~dataset.truth["heldout"].values
    values = dataset.truth["genetic_value"].values[phenotyped]
    values = torch.as_tensor(values - values.mean(0), dtype=torch.float64)  # [V, K]
    rows = torch.as_tensor(np.flatnonzero(phenotyped))
    correlations = []
    for columns in data.markers.column_chunks():
        z = data.markers.standardized_columns(columns, torch.float64)[rows]  # [V, C]
        z = z - z.mean(0)
        norms = z.norm(dim=0)[:, None] * values.norm(dim=0)  # [C, K]
        correlations.append((z.T @ values).abs() / norms.clamp(min=1e-12))
    return torch.cat(correlations).numpy()


def oracle_response(dataset, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V, K]`` response over all varieties (0 for the held-out ones), centred over the
    phenotyped, and ``[V, K]`` its precisions (0 for the held-out), for
    :func:`sparse_bayesian_learning`.

    ``target="genetic"``: the true genetic values, noise variance the polygenic background's,
    ``(1 - qtl_share) * var(g)`` (at least ``1e-3 var(g)``). ``target="curves"``: per variety,
    the mean over scenarios and plants of ``individual_parameter - scenario_mean``; noise
    variance that plus ``(variety_scenario_sd ** 2 + plant_sd ** 2 / P) / S``.
    """
    truth = dataset.truth
    phenotyped = ~truth["heldout"].values
    genetic = truth["genetic_value"].values
    noise = np.maximum((1 - truth["qtl_share"].values), 1e-3) * genetic[phenotyped].var(0)
    if target == "curves":
        dims = ("variety", "scenario", "plant", "curve_parameter")
        plants = truth["individual_parameter"].transpose(*dims).values
        deviation = plants - truth["scenario_mean"].values[None, :, None, :]
        response = deviation.mean((1, 2))
        n_scenarios, n_plants = plants.shape[1:3]
        within = truth["variety_scenario_sd"].values ** 2 + truth["plant_sd"].values ** 2 / n_plants
        noise = noise + within / n_scenarios
    elif target == "genetic":
        response = genetic
    else:
        raise ValueError(f"unknown oracle target {target!r}")
    centred = np.where(phenotyped[:, None], response - response[phenotyped].mean(0), 0.0)
    precision = np.where(phenotyped[:, None], 1.0 / noise, 0.0)
    return torch.as_tensor(centred), torch.as_tensor(precision)


def sparse_bayesian_learning(
    markers, response: torch.Tensor, weight: torch.Tensor, max_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tipping & Faul's (2003) fast marginal-likelihood maximisation: every effect
    ``b[m, k] ~ Normal(0, v[m, k])``, ``v`` by type-II maximum likelihood, all starting at 0.
    Each iteration, per curve parameter, changes the one ``v[m, k]`` (added, re-estimated or
    deleted) whose optimum ``max(0, (q^2 - s) / s^2)`` raises the log marginal likelihood most
    (:meth:`GaussianRegressionPosterior.marker_evidence`); it stops when no change gains
    ``1e-3`` nats, or after ``max_iterations`` (each adds at most one marker per parameter; a
    top 50 needs about 50).

    :returns: the posterior mean effects ``[M, K]``, each marker's evidence ``q^2 / s`` given
        the others ``[M, K]`` (a ranking of the markers left at 0), both after the last change,
        and the number of changes made (per curve parameter).
    """
    n_markers, n_parameters = markers.n_markers, response.shape[1]
    variance = torch.zeros(n_markers, n_parameters, dtype=torch.float64)
    unit = torch.ones(n_parameters, dtype=torch.float64)
    columns = torch.arange(n_parameters)
    for iterations in range(max_iterations + 1):  # the last pass only reads the final fit
        active = torch.nonzero(variance.sum(1)).flatten()
        z = markers.standardized_columns(active, torch.float64)  # [V, A]: few columns
        gram = torch.einsum("va,ak,wa->kvw", z, variance[active], z)
        posterior = GaussianRegressionPosterior(markers, response, weight, unit, variance, gram)
        precision, score = posterior.marker_evidence()
        if iterations == max_iterations:
            break
        excess = score**2 - precision  # > 0 only where s > 0 (monomorphic markers: s = q = 0)
        optimum = torch.where(excess > 0, excess / precision**2, 0.0)
        gain = single_effect_log_evidence(precision, score, optimum) - single_effect_log_evidence(
            precision, score, variance
        )
        best = gain.argmax(0)
        if gain[best, columns].max() < 1e-3:
            break
        variance[best, columns] = optimum[best, columns]
    evidence = torch.where(precision > 0, score**2 / precision, 0.0)
    return posterior.loc, evidence, iterations


def ranking_scores(keys: list[np.ndarray], truth, k: int, window: int) -> dict:
    """Power and false discoveries of the top-50 markers of curve parameter ``k``, ranked by
    the last of ``keys`` (``[M, K]`` each), ties broken by the ones before."""
    chromosome, position = truth["chromosome"].values, truth["position"].values
    qtl = np.flatnonzero(truth["qtl"].values[:, k])
    top = np.lexsort([-key[:, k] for key in keys])[:TOP]
    return {
        "power_exact": np.isin(qtl, top).mean(),
        "power_ld": ld_hits(qtl, top, chromosome, position, window).mean(),
        "false_top50": int((~ld_hits(top, qtl, chromosome, position, window)).sum()),
    }


def score(prior, fit, dataset, data, window) -> list[dict]:
    posterior = fit.inference_data.posterior
    truth = dataset.truth
    heldout = truth["heldout"].values
    if prior == "neural":
        predicted = posterior["marker_network_value"].mean(("chain", "draw", "scenario")).values
        keys = None
    else:
        effect = (
            fit.inference_data[GUIDE_MEAN]["marker_effect"].values
            if GUIDE_MEAN in fit.inference_data.groups()
            else posterior["marker_effect"].mean(("chain", "draw")).values
        )
        predicted = data.markers.standardized_matmul(torch.as_tensor(effect).float()).numpy()
        keys = [np.abs(effect)]
        if "marker_effect_inclusion_probability" in posterior:
            pip = posterior["marker_effect_inclusion_probability"].mean(("chain", "draw")).values
            keys.append(pip.round(3))  # primary key (last); ties broken by |effect|
    true_value = truth["genetic_value"].values
    rows = []
    for k, parameter in enumerate(CURVE_PARAMETERS):
        row = {
            "prior": prior,
            "curve_parameter": parameter,
            "r_heldout": np.corrcoef(predicted[heldout, k], true_value[heldout, k])[0, 1],
            "gsd_ratio": predicted[~heldout, k].std() / true_value[~heldout, k].std(),
        }
        if "genetic_sd" in posterior:
            row["genetic_sd_post"] = float(
                posterior["genetic_sd"].sel(curve_parameter=parameter).mean()
            )
        if keys is not None:
            row.update(ranking_scores(keys, truth, k, window))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--priors", nargs="+", default=["ridge", "horseshoe", "spike_slab", "neural"]
    )
    parser.add_argument("--varieties", type=int, default=200)
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--qtl-share", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=0, help="0: all varieties each step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--ld-window", type=int, default=20)
    parser.add_argument(
        "--ard-iterations", type=int, default=60, help="oracle_ard_*: most greedy iterations"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parametrization",
        choices=PARAMETRIZATIONS,
        default="centred",
        help="g2was parametrization (the coordinate-ascent marker updates need 'centred')",
    )
    parser.add_argument(
        "--marker-updates",
        choices=MARKER_UPDATES,
        default="cavi",
        help="spike-and-slab priors: marker effects by coordinate ascent or by Adam",
    )
    parser.add_argument(
        "--cavi-priors",
        nargs="+",
        default=["spike_slab", "spike_slab_shared"],
        help="priors whose effects take --marker-updates (the others: Adam)",
    )
    parser.add_argument("--out", default="docs/sparse_qtl_benchmark.md")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of other seeds in the CSV beside --out (a run with the same "
        "settings: the table is written for every seed)",
    )
    args = parser.parse_args()
    # On a shared 2-core machine torch's two intra-op threads made a step 10x slower than one.
    torch.set_num_threads(args.threads)

    config = DesignConfig(
        n_varieties=args.varieties,
        n_heldout=args.heldout,
        n_markers=60_000,
        n_plants=1,
        n_days=args.days,
        sparse_qtl=True,
        qtl_variance_share=args.qtl_share,
    )
    svi = SVIConfig(
        guide="normal",
        batch_size=args.batch or None,
        max_steps=args.steps,
        lr=args.lr,
        lr_final=args.lr / 10,
        stopping=None,
        num_draws=args.draws,
        progress=False,
    )
    rows, earlier = [], pd.DataFrame()
    if args.append:
        earlier = pd.read_csv(Path(args.out).with_suffix(".csv"))
        earlier = earlier[~earlier["seed"].isin(args.seeds)]
        args.seeds = sorted({*earlier["seed"], *args.seeds})
    started = time.perf_counter()
    for seed in sorted(set(args.seeds) - set(earlier.get("seed", []))):
        dataset = simulate_design(config, seed=seed)
        data = load_data(dataset.phenotypes, markers=dataset.genotype_table())
        order = [data.variety_ids.index(v) for v in dataset.variety_ids]
        assert order == list(range(len(order))), "data rows must follow the simulator's"
        for prior in args.priors:
            tic = time.perf_counter()
            if prior == ORACLE_SCAN or prior in ORACLE_ARD:
                if prior == ORACLE_SCAN:
                    keys, extra = [oracle_scan(dataset, data)], {}
                else:
                    response, weight = oracle_response(dataset, ORACLE_ARD[prior])
                    loc, evidence, iterations = sparse_bayesian_learning(
                        data.markers, response, weight, args.ard_iterations
                    )
                    keys = [evidence.numpy(), loc.abs().numpy()]
                    extra = {"iterations": iterations}
                wall = time.perf_counter() - tic
                for k, parameter in enumerate(CURVE_PARAMETERS):
                    scores = ranking_scores(keys, dataset.truth, k, args.ld_window)
                    rows.append(
                        {
                            "seed": seed,
                            "wall_s": wall,
                            "prior": prior,
                            "curve_parameter": parameter,
                            **extra,
                            **scores,
                        }
                    )
                continue
            updates = args.marker_updates if prior in args.cavi_priors else "gradient"
            fit = fit_svi(
                g2was,
                data,
                dataclasses.replace(svi, seed=seed, marker_updates=updates),
                model_kwargs={"marker_prior": prior, "parametrization": args.parametrization},
            )
            wall = time.perf_counter() - tic
            for row in score(prior, fit, dataset, data, args.ld_window):
                rows.append({"seed": seed, "wall_s": wall, **row})
            print(pd.DataFrame(rows).tail(3).to_string(), flush=True)
        table = pd.concat([earlier, pd.DataFrame(rows)], ignore_index=True)
        write(
            table.sort_values("seed", kind="stable"),
            args,
            config,
            svi,
            time.perf_counter() - started,
        )


def write(table: pd.DataFrame, args, config: DesignConfig, svi: SVIConfig, total: float):
    out = Path(args.out)
    table.to_csv(out.with_suffix(".csv"), index=False)
    metrics = ["power_exact", "power_ld", "false_top50", "r_heldout", "gsd_ratio"]
    grouped = table.groupby(["prior", "curve_parameter"], sort=False)
    grouped = grouped[[metric for metric in metrics if metric in table]]
    summary = grouped.mean().join(grouped.sem().add_suffix("_se"))
    lines = [
        "# Sparse-QTL benchmark",
        "",
        f"Command: `python benchmarks/sparse_qtl.py --seeds {' '.join(map(str, args.seeds))} "
        f"--priors {' '.join(args.priors)} "
        f"--steps {args.steps} --batch {args.batch} --lr {args.lr} --varieties {args.varieties} "
        f"--heldout {args.heldout} --days {args.days} --qtl-share {args.qtl_share} "
        f"--draws {args.draws} --ld-window {args.ld_window} --threads {args.threads} "
        f"--ard-iterations {args.ard_iterations} "
        f"--parametrization {args.parametrization} --marker-updates {args.marker_updates}"
        + (
            f" --cavi-priors {' '.join(args.cavi_priors)}`"
            if args.cavi_priors != ["spike_slab", "spike_slab_shared"]
            else "`"
        ),
        "",
        f"Design: {config.n_varieties} phenotyped + {config.n_heldout} held-out varieties, "
        f"3 scenarios, {config.n_plants} plant, {config.n_days} days, {config.n_markers} markers; "
        f"sparse-QTL mode, {config.n_qtl} QTL per curve parameter ({config.n_shared_qtl} shared), "
        f"QTL share of the genetic variance {config.qtl_variance_share}. "
        f"SVI: mean-field guide ({args.parametrization} g2was; {', '.join(args.cavi_priors)} "
        f"effects by {'coordinate ascent' if args.marker_updates == 'cavi' else 'Adam'}), "
        f"{svi.max_steps} steps, batch {svi.batch_size or 'all'}, "
        f"lr {svi.lr} -> {svi.lr_final}, {svi.num_draws} draws. Wall time of this run "
        f"{total:.0f} s"
        + (" (seeds kept from an earlier run: see wall_s)." if args.append else "."),
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; "
        f"versions: {json.dumps(package_versions())}",
        "",
        "Mean over seeds (`_se`: its standard error, the SD over seeds / sqrt(seeds)):",
        "",
        markdown_table(summary.reset_index()),
        "",
        "Per seed:",
        "",
        markdown_table(table),
        "",
    ]
    notes = out.read_text().partition("\n## Notes")[2] if out.exists() else ""
    if notes:  # written by hand below the tables: kept
        lines.append("## Notes" + notes.rstrip("\n") + "\n")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
