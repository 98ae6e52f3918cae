"""SAEM and SVI on the simulated target design (the g2was model with markers): do they agree on
the population parameters within their uncertainty, and has each converged?

SAEM fits the effects form (marker effects integrated out by the kernel-form M-step,
``pyro_nlme.infer.saem.field``); SVI fits the kinship form, its exact marginal, with the
project's recommended configuration (``docs/svi.md``: amortised guide anchored at conditional
modes, centred parametrisation, plateau stopping rule). Both forms have the same population
sites. Replaces its own section of ``docs/saem_benchmark.md`` (the rest of the file is kept) and
draws SAEM's convergence history to
``docs/figures/saem_target_design_{varieties}x{markers}_convergence.png``.

    python benchmarks/saem_target_design.py --threads 1 [--varieties 40] [--markers 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from nuts_target_design import SVI_SETTINGS  # benchmarks/ is on the path of its scripts

from pyro_nlme.data import load_data
from pyro_nlme.infer.saem import SAEMConfig, plot_convergence
from pyro_nlme.infer.saem.algorithm import fit_saem_with_run
from pyro_nlme.infer.saem.common import conditional_run, make_target
from pyro_nlme.infer.saem.estep import e_step
from pyro_nlme.infer.saem.likelihood import Proposal, importance_sampling
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate.design import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was

HEADING = "## Simulated target design: SAEM and SVI"


def section_heading(varieties: int, markers: int) -> str:
    """The heading of one design size's section: runs of other sizes keep their own."""
    return f"{HEADING} (g2was, {varieties} varieties, {markers} markers)"


def figure_path(varieties: int, markers: int) -> str:
    return f"docs/figures/saem_target_design_{varieties}x{markers}_convergence.png"


def svi_summary(result, labels_by_site: dict[str, list[str]]) -> pd.DataFrame:
    """Posterior mean and SD of every reported scalar, from SVI's exported draws."""
    posterior = result.inference_data.posterior
    rows = {}
    for site, labels in labels_by_site.items():
        values = posterior[site].values
        flat = values.reshape(values.shape[0] * values.shape[1], -1)
        for k, label in enumerate(labels):
            rows[label] = {"svi mean": flat[:, k].mean(), "svi sd": flat[:, k].std()}
    return pd.DataFrame(rows).T


def saem_drift(history: pd.DataFrame, burn_in: int) -> pd.DataFrame:
    """Two flatness measures of SAEM's history (natural scale), per parameter:

    - ``K1 trend``: mean of the last quarter of the first phase minus the mean of its third
      quarter (with step size 1 the iterates fluctuate around a stationary level once the
      chain has converged, so this is noise only);
    - ``K2 change``: the final estimate minus the estimate halfway through the second phase.
    """
    first = history.iloc[:burn_in]
    quarter = burn_in // 4
    third, last = first.iloc[-2 * quarter : -quarter], first.iloc[-quarter:]
    halfway = burn_in + (len(history) - burn_in) // 2
    return pd.DataFrame(
        {
            "K1 trend": last.mean() - third.mean(),
            "K1 sd": last.std(),
            "K2 change": history.iloc[-1] - history.iloc[halfway],
        }
    )


def conditional_minus_two_ll(joint, state, theta, config: SAEMConfig, sweeps: int = 100):
    """-2 log p(y | theta, g = SAEM's E[g | y]) by SAEM's importance sampling: E-step chains
    moved to ``theta`` (``sweeps`` adapting, then ``config.conditional_iterations`` kept for the
    proposal), then ``config.importance_samples`` draws per variety."""
    rows = joint.rows(config.chains)
    target = make_target(joint, theta, rows)
    for _ in range(sweeps):
        state, _ = e_step(state, target, config.kernel, adapt=True)
    posterior = conditional_run(
        joint, theta, state, rows, config.chains, config.kernel, config.conditional_iterations, 1
    )
    proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=config.seed)
    return importance_sampling(joint, theta, proposal, config.importance_samples)


def with_values(joint, theta, values: dict[str, pd.Series], sites: set[str]):
    """``theta`` with the population sites in ``sites`` set to ``values`` (by reported label,
    natural scale)."""
    population = joint.population_values(theta)
    for site in sites:
        current = population[site]
        labels = [label for label in values.index if label.split("[")[0] == site]
        population[site] = torch.as_tensor(values[labels].to_numpy(), dtype=current.dtype).reshape(
            current.shape
        )
    return joint.theta_from_values(population)


def splice(document: str, heading: str, section: str) -> str:
    """``document`` with the section under ``heading`` (up to the next ``## `` heading)
    replaced by ``section``, or ``section`` appended if there is none."""
    lines = document.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line == heading), None)
    if start is None:
        return "\n".join(lines + ["", section.rstrip("\n"), ""])
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = [""] + lines[end:] if end < len(lines) else []
    return "\n".join(lines[:start] + section.rstrip("\n").split("\n") + tail) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--varieties", type=int, default=40)
    parser.add_argument("--markers", type=int, default=300)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--iterations", default="300,200", help="SAEM's K1,K2")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--kernel", default="dense_mala")
    parser.add_argument("--svi-steps", type=int, default=7500, help="SVI's step budget")
    parser.add_argument(
        "--svi-long",
        type=int,
        default=0,
        help="also fit SVI for this many steps without the stopping rule (convergence check)",
    )
    parser.add_argument("--svi-batch", type=int, default=64, help="0: full batch")
    parser.add_argument("--svi-draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="both engines' seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default="docs/saem_benchmark.md")
    parser.add_argument("--figure", default=None, help="default: one file per design size")
    args = parser.parse_args()
    args.figure = args.figure or figure_path(args.varieties, args.markers)
    if args.threads:
        torch.set_num_threads(args.threads)
    simulated = simulate_design(
        DesignConfig(n_varieties=args.varieties, n_heldout=0, n_markers=args.markers),
        seed=args.data_seed,
    )
    data = load_data(simulated.phenotypes, markers=simulated.genotype_table())
    burn_in, decreasing = (int(k) for k in args.iterations.split(","))
    load_start = os.getloadavg()[0]

    start = time.perf_counter()
    saem_config = SAEMConfig(
        iterations=(burn_in, decreasing),
        chains=args.chains,
        kernel=args.kernel,
        seed=args.seed,
        progress=False,
        jit=True,
    )
    saem, joint, run = fit_saem_with_run(
        g2was, data, saem_config, model_name="g2was", model_kwargs={"marker_form": "effects"}
    )
    saem_seconds = time.perf_counter() - start
    table = saem.population_summary.set_index("parameter")
    print(saem.report(), flush=True)

    svi_config = SVIConfig(  # the README's settings
        **{**SVI_SETTINGS, "max_steps": args.svi_steps},
        batch_size=args.svi_batch or None,
        noncentred_sites=("genetic_value_component",),
        num_draws=args.svi_draws,
        seed=args.seed,
        progress=False,
    )
    start = time.perf_counter()
    svi = fit_svi(
        g2was,
        data,
        svi_config,
        model_name="g2was",
        model_kwargs={"marker_form": "kinship", "parametrization": "centred"},
    )
    svi_seconds = time.perf_counter() - start
    steps = len(svi.history)
    stopped_by = "the plateau rule" if steps < args.svi_steps else "the step budget"
    svi_long = None
    if args.svi_long:
        start = time.perf_counter()
        svi_long = fit_svi(
            g2was,
            data,
            dataclasses.replace(svi_config, max_steps=args.svi_long, stopping=None),
            model_name="g2was",
            model_kwargs={"marker_form": "kinship", "parametrization": "centred"},
        )
        svi_long_seconds = time.perf_counter() - start
    load_end = os.getloadavg()[0]

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
    combined = np.sqrt(frame["saem SE"].fillna(0.0) ** 2 + frame["svi sd"] ** 2)
    frame["(saem - svi) / combined"] = (frame["saem"] - frame["svi mean"]) / combined
    if svi_long is not None:
        long = svi_summary(svi_long, labels_by_site)
        frame["svi long mean"], frame["svi long sd"] = long["svi mean"], long["svi sd"]
        frame["(saem - svi long) / combined"] = (frame["saem"] - frame["svi long mean"]) / np.sqrt(
            frame["saem SE"].fillna(0.0) ** 2 + frame["svi long sd"] ** 2
        )
    drift = saem_drift(saem.history, burn_in)
    frame["saem K1 trend / combined"] = drift["K1 trend"] / combined
    frame["saem K2 change / combined"] = drift["K2 change"] / combined
    frame.index.name = "parameter"
    # Which engine's point explains the data better: -2LL conditional on SAEM's E[g | y] at
    # SAEM's estimate and with some or all of SVI's posterior means in its place.
    svi_means = frame["svi mean"]
    groups = {
        "SAEM's estimate": set(),
        "SVI's posterior means (all)": set(labels_by_site),
        "SAEM's, with SVI's noise and plant SDs": {"noise_sd", "plant_sd"},
        "SAEM's, with SVI's scenario means": {"scenario_mean"},
    }
    likelihoods = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        for name, sites in groups.items():
            theta = with_values(joint, run.theta, svi_means, sites)
            likelihoods[name] = conditional_minus_two_ll(joint, run.state, theta, saem_config)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    plot_convergence(saem.history, args.figure, burn_in=burn_in)

    agree = frame["(saem - svi) / combined"].abs()
    attrs = saem.population_summary.attrs
    command = (
        f"python benchmarks/saem_target_design.py --varieties {args.varieties} --markers "
        f"{args.markers} --iterations {args.iterations} --chains {args.chains} --kernel "
        f"{args.kernel} --svi-steps {args.svi_steps}"
        + (f" --svi-long {args.svi_long}" if args.svi_long else "")
        + f" --svi-batch {args.svi_batch}"
        + (f" --threads {args.threads}" if args.threads else "")
    )
    lines = [
        section_heading(args.varieties, args.markers),
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}: {args.varieties} varieties "
        f"x 3 scenarios x 2 plants x 21 days, {args.markers} markers (simulator seed "
        f"{args.data_seed}). Machine: {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, load average (1 min) {load_start:.1f} at the start and "
        f"{load_end:.1f} at the end (shared with other jobs: wall times are indicative).",
        "",
        f"- SAEM: effects form, marker effects integrated out (kernel form), iterations "
        f"({burn_in}, {decreasing}), {args.chains} chains, {args.kernel} kernel, JIT, seed "
        f"{args.seed}: {saem_seconds:.0f} s. -2LL {attrs['-2LL']:.2f} (Monte-Carlo SE "
        f"{attrs['-2LL_mcse']:.2f}), conditional on the genetic values at E[g | y].",
        f"- SVI: kinship form, centred (genetic values' eigen-components non-centred), "
        f"amortised guide anchored at conditional modes, lr 0.02 decaying over 2,500 steps, "
        f"{'full batch' if not args.svi_batch else f'batch {args.svi_batch}'}, "
        f"{steps} steps (stopped by {stopped_by}; budget {args.svi_steps}), "
        f"{args.svi_draws} draws: {svi_seconds:.0f} s.",
        *(
            [
                f"- SVI, longer run: the same for {args.svi_long} steps without the stopping "
                f"rule: {svi_long_seconds:.0f} s."
            ]
            if svi_long is not None
            else []
        ),
        f"- Largest |SAEM - SVI| / combined uncertainty: {agree.max():.2f} "
        f"({agree.idxmax()}); {int((agree > 2).sum())} of {len(agree)} parameters above 2.",
        "",
        "combined = sqrt(SAEM SE^2 + SVI posterior SD^2) (SVI's SD alone where SAEM has no SE). "
        "SAEM K1 trend: mean of the last quarter of the first phase minus mean of its third "
        "quarter; K2 change: final estimate minus the estimate halfway through the second phase "
        f"(history: `{args.figure}`).",
        "",
        "| parameter | " + " | ".join(frame.columns) + " |",
        "|---|" + "---|" * len(frame.columns),
    ]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    lines += [
        "",
        "-2LL conditional on SAEM's E[g | y] (SAEM's importance sampling, "
        f"{saem_config.importance_samples} draws per variety, proposal from "
        f"{saem_config.conditional_iterations} E-step sweeps at each point):",
        "",
        "| population values | -2LL | Monte-Carlo SE | minus SAEM's |",
        "|---|---|---|---|",
    ]
    reference = likelihoods["SAEM's estimate"].minus_two
    for name, value in likelihoods.items():
        lines.append(
            f"| {name} | {value.minus_two:.2f} | {2 * value.mcse:.2f} | "
            f"{value.minus_two - reference:.2f} |"
        )
    section = "\n".join(lines) + "\n"
    path = Path(args.out)
    path.write_text(
        splice(
            path.read_text() if path.exists() else "",
            section_heading(args.varieties, args.markers),
            section,
        )
    )
    print(section)
    for message in saem.warnings + svi.warnings + (svi_long.warnings if svi_long else []):
        print("warning:", message)


if __name__ == "__main__":
    main()
