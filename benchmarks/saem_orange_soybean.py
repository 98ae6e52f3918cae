"""SAEM benchmark: Orange against the exact maximum likelihood, Orange and Soybean against
pynlme's saemix-style SAEM (if installed: ``pip install pynlme``, benchmark only), wall times
side by side. Writes ``docs/saem_benchmark.md``.

    python benchmarks/saem_orange_soybean.py   # full settings (~12 min, 2 cores)
    python benchmarks/saem_orange_soybean.py --quick    # a smoke run
    python benchmarks/saem_orange_soybean.py --only soybean --threads 1   # one section only
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pyro_nlme.data import load_orange, load_soybean
from pyro_nlme.data.bundled import bundled_path
from pyro_nlme.export.inference_data import package_versions
from pyro_nlme.infer.saem import SAEMConfig, fisher, fit_saem, log_likelihood_at, mstep
from pyro_nlme.infer.saem.common import conditional_run, make_target, reported
from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.infer.saem.likelihood import Proposal, importance_sampling
from pyro_nlme.reference import exact_mle, marginal_log_likelihood
from pyro_nlme_models.orange import orange
from pyro_nlme_models.soybean import soybean

ORANGE = ("asymptote", "inflection", "scale", "asymptote_sd", "noise_sd")


def pynlme_version() -> str | None:
    try:
        import pynlme
    except ImportError:
        return None
    return getattr(pynlme, "__version__", "installed")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ours(model, data, config, **kwargs):
    result, seconds = timed(lambda: fit_saem(model, data, config, model_kwargs=kwargs))
    return result.population_summary.set_index("parameter"), seconds


# -- pynlme (saemix interface) -------------------------------------------------------------


def pynlme_orange(iterations, chains, seed):
    from pynlme import r

    frame = pd.read_csv(bundled_path("Orange.csv"))
    data = r.saemixData({c: frame[c].to_numpy() for c in frame}, "Tree", ["age"], "circumference")

    def logistic(psi, id, xidep):  # noqa: A002 (saemix's signature)
        return psi[id, 0] / (1 + np.exp(-(xidep[:, 0] - psi[id, 1]) / psi[id, 2]))

    model = r.saemixModel(
        logistic,
        {"Asym": 200.0, "xmid": 700.0, "scal": 350.0},
        covariance_model=np.diag([1.0, 0.0, 0.0]),
        error_model="constant",
    )
    control = {"nbiter.saemix": iterations, "nb.chains": chains, "seed": seed}
    fit, seconds = timed(lambda: r.saemix(model, data, control))
    omega = np.asarray(fit["omega"], dtype=float)
    return (
        {
            "asymptote": fit["population"]["Asym"],
            "inflection": fit["population"]["xmid"],
            "scale": fit["population"]["scal"],
            "asymptote_sd": float(np.sqrt(omega[0, 0])),
            "noise_sd": fit["respar"]["a.1"],
            "-2LL": -2 * fit["logLik"],
        },
        {
            "asymptote": fit["se_population"]["Asym"],
            "inflection": fit["se_population"]["xmid"],
            "scale": fit["se_population"]["scal"],
        },
        seconds,
    )


def pynlme_soybean(iterations, chains, seed):
    from pynlme import r

    frame = pd.read_csv(bundled_path("Soybean.csv"))
    columns = {
        "Plot": frame["Plot"].astype(str).to_numpy(),
        "Time": frame["Time"].to_numpy(float),
        "weight": frame["weight"].to_numpy(float),
        "VarietyP": (frame["Variety"] == "P").to_numpy(float),
        "Year1989": (frame["Year"] == 1989).to_numpy(float),
        "Year1990": (frame["Year"] == 1990).to_numpy(float),
    }
    covariates = ["VarietyP", "Year1989", "Year1990"]
    data = r.saemixData(columns, "Plot", ["Time"], "weight", covariates)

    def logistic(psi, id, xidep):  # noqa: A002
        return psi[id, 0] / (1 + np.exp(-(xidep[:, 0] - psi[id, 1]) / psi[id, 2]))

    model = r.saemixModel(
        logistic,
        {"Asym": 19.0, "xmid": 55.0, "scal": 8.0},
        transform_par=[1, 0, 1],
        covariate_model={p: covariates for p in ("Asym", "xmid", "scal")},
        covariance_model=np.ones((3, 3)),
        error_model="proportional",
    )
    control = {"nbiter.saemix": iterations, "nb.chains": chains, "seed": seed}
    fit, seconds = timed(lambda: r.saemix(model, data, control))
    out = {
        "intercept[log_asymptote]": np.log(fit["population"]["Asym"]),
        "intercept[inflection]": fit["population"]["xmid"],
        "intercept[log_scale]": np.log(fit["population"]["scal"]),
    }
    names = {"Asym": "log_asymptote", "xmid": "inflection", "scal": "log_scale"}
    labels = {"VarietyP": "Variety[P]", "Year1989": "Year[1989]", "Year1990": "Year[1990]"}
    for p, ours_name in names.items():
        for c, label in labels.items():
            out[f"covariate_effect[{label},{ours_name}]"] = fit["covariate_effects"][
                f"beta_{c}({p})"
            ]
    omega = np.asarray(fit["omega"], dtype=float)
    sd = np.sqrt(np.diag(omega))
    order = list(names.values())
    for k, name in enumerate(order):
        out[f"random_effect_sd[{name}]"] = sd[k]
    for i in range(3):
        for j in range(i):
            out[f"random_effect_corr[{order[i]},{order[j]}]"] = omega[i, j] / (sd[i] * sd[j])
    out["noise_cv"] = fit["respar"]["b.1"]
    out["-2LL"] = -2 * fit["logLik"]
    corr = omega / np.outer(sd, sd)
    effects = np.array(
        [[out[f"covariate_effect[{label},{p}]"] for p in order] for label in labels.values()]
    )
    values = {
        "intercept": [out[f"intercept[{p}]"] for p in order],
        "covariate_effect": effects,
        "random_effect_sd": sd,
        "random_effect_corr": np.linalg.cholesky(corr),
        "noise_cv": out["noise_cv"],
    }
    return out, values, seconds


def pynlme_soybean_nlme():
    """pynlme's ``nlmefit`` (Lindstrom-Bates maximum likelihood, R nlme's conventions) on the
    same model: log asymptote, inflection, log scale, each with Variety and Year effects, a full
    3 x 3 random-effect covariance, proportional error."""
    import pynlme

    frame = pd.read_csv(bundled_path("Soybean.csv"))
    groups = frame["Plot"].astype(str).to_numpy()
    plots = sorted(set(groups))
    per_plot = frame.groupby(frame["Plot"].astype(str)).first().loc[plots]
    columns = np.stack(
        [
            np.ones(len(plots)),
            (per_plot["Variety"] == "P").to_numpy(float),
            (per_plot["Year"] == 1989).to_numpy(float),
            (per_plot["Year"] == 1990).to_numpy(float),
        ],
        1,
    )
    design = np.zeros((3, 12, len(plots)))  # phi_p = sum_c beta[4 p + c] * columns[:, c]
    for p in range(3):
        design[p, 4 * p : 4 * p + 4, :] = columns.T

    def logistic(phi, x, v=None):
        return phi[0] / (1 + np.exp(-(x[:, 0] - phi[1]) / phi[2]))

    beta0 = np.zeros(12)
    beta0[[0, 4, 8]] = [np.log(19.0), 55.0, np.log(8.0)]
    (beta, psi, stats, _), seconds = timed(
        lambda: pynlme.nlmefit(
            frame[["Time"]].to_numpy(float),
            frame["weight"].to_numpy(float),
            groups,
            None,
            logistic,
            beta0,
            ParamTransform=[1, 0, 1],
            FEGroupDesign=design,
            CovPattern=np.ones((3, 3)),
            ErrorModel="proportional",
            compat="r",
        )
    )
    order = ("log_asymptote", "inflection", "log_scale")
    labels = ("Variety[P]", "Year[1989]", "Year[1990]")
    estimate, se = {}, {}
    for p, name in enumerate(order):
        estimate[f"intercept[{name}]"] = beta[4 * p]
        se[f"intercept[{name}]"] = stats.sebeta[4 * p]
        for c, label in enumerate(labels):
            estimate[f"covariate_effect[{label},{name}]"] = beta[4 * p + 1 + c]
            se[f"covariate_effect[{label},{name}]"] = stats.sebeta[4 * p + 1 + c]
    sd = np.sqrt(np.diag(psi))
    corr = psi / np.outer(sd, sd)
    for k, name in enumerate(order):
        estimate[f"random_effect_sd[{name}]"] = sd[k]
    for i in range(3):
        for j in range(i):
            estimate[f"random_effect_corr[{order[i]},{order[j]}]"] = corr[i, j]
    estimate["noise_cv"] = float(np.ravel(stats.errorparam)[0])
    estimate["-2LL"] = -2 * stats.logl
    # A correlation of exactly +-1 has no Cholesky factor: nudge it inside for our sampler.
    shrunk = 0.999999 * corr + 0.000001 * np.eye(3)
    values = {
        "intercept": beta[[0, 4, 8]],
        "covariate_effect": np.array([[beta[4 * p + 1 + c] for p in range(3)] for c in range(3)]),
        "random_effect_sd": sd,
        "random_effect_corr": np.linalg.cholesky(shrunk),
        "noise_cv": estimate["noise_cv"],
    }
    return estimate, se, values, seconds


# -- report --------------------------------------------------------------------------------


def markdown(frame: pd.DataFrame, digits: int = 6) -> str:
    def cell(x):
        if isinstance(x, float | np.floating):
            return f"{x:.{digits}g}" if np.isfinite(x) else ""
        return str(x)

    header = "| " + " | ".join([frame.index.name or ""] + list(frame.columns)) + " |"
    rule = "|" + "---|" * (len(frame.columns) + 1)
    rows = [
        "| " + " | ".join([str(i)] + [cell(v) for v in row]) + " |" for i, row in frame.iterrows()
    ]
    return "\n".join([header, rule, *rows])


ORANGE_HEADING = "## Orange:"
SOYBEAN_HEADING = "## Soybean:"
TIME_HEADING = "## Wall time"


def orange_section(iterations, chains, importance, jit, version) -> tuple[str, dict]:
    """Orange: exact, ours (saemix's settings and an accurate setting), pynlme."""
    data = load_orange()
    exact = exact_mle(data)
    saemix_like = SAEMConfig(iterations=iterations, chains=chains, progress=False, seed=1, jit=jit)
    accurate = SAEMConfig(
        iterations=(200, 300),
        chains=50,
        progress=False,
        seed=1,
        importance_samples=importance,
        jit=jit,
    )
    table_default, t_default = ours(orange, data, saemix_like)
    table_accurate, t_accurate = ours(orange, data, accurate)
    rows = {}
    for p in ORANGE:
        se = exact.standard_error[p]
        rows[p] = {
            "exact": exact.estimate[p],
            "exact SE": se,
            f"ours C={chains}": table_default.loc[p, "estimate"],
            f"ours C={chains} (diff/SE)": (table_default.loc[p, "estimate"] - exact.estimate[p])
            / se,
            "ours C=50": table_accurate.loc[p, "estimate"],
            "ours C=50 (diff/SE)": (table_accurate.loc[p, "estimate"] - exact.estimate[p]) / se,
            "ours C=50 SE": table_accurate.loc[p, "se"],
            "ours C=50 SE/exact": table_accurate.loc[p, "se"] / se,
        }
    rows["-2LL"] = {
        "exact": exact.minus_two_log_likelihood,
        f"ours C={chains}": table_default.attrs["-2LL"],
        "ours C=50": table_accurate.attrs["-2LL"],
        "ours C=50 (diff/SE)": np.nan,
    }
    times = {f"ours SAEM C={chains}": t_default, "ours SAEM C=50": t_accurate}
    if version:
        estimate, se, t_pynlme = pynlme_orange(iterations, chains, seed=1)
        for p in ORANGE:
            rows[p]["pynlme"] = estimate[p]
            rows[p]["pynlme (diff/SE)"] = (estimate[p] - exact.estimate[p]) / exact.standard_error[
                p
            ]
        rows["-2LL"]["pynlme"] = estimate["-2LL"]
        exact_at_pynlme = marginal_log_likelihood(
            torch.tensor([estimate[p] for p in ORANGE], dtype=torch.float64), data
        )
        rows["-2LL (exact, at this estimate)"] = {
            "exact": exact.minus_two_log_likelihood,
            f"ours C={chains}": -2
            * float(
                marginal_log_likelihood(
                    torch.tensor([table_default.loc[p, "estimate"] for p in ORANGE]), data
                )
            ),
            "ours C=50": -2
            * float(
                marginal_log_likelihood(
                    torch.tensor([table_accurate.loc[p, "estimate"] for p in ORANGE]), data
                )
            ),
            "pynlme": -2 * float(exact_at_pynlme),
        }
        times[f"pynlme saemix C={chains}"] = t_pynlme
    frame = pd.DataFrame(rows).T
    frame.index.name = "parameter"
    text = (
        f"{ORANGE_HEADING} random asymptote per tree, against the exact maximum likelihood\n\n"
        f"SAEM iterations {iterations} (saemix's settings: {chains} chains) and (200, 300) with "
        "50 chains; diff/SE = (estimate - exact) / exact SE.\n\n" + markdown(frame)
    )
    return text, times


def soybean_section(iterations, chains, importance, jit, version) -> tuple[str, dict]:
    """Soybean: ours vs pynlme's saemix and nlmefit, proportional error (saemix has no
    power-of-mean model)."""
    soy = load_soybean()
    kwargs = {"likelihood": "proportional"}
    soy_config = SAEMConfig(
        iterations=iterations,
        chains=chains,
        progress=False,
        seed=1,
        importance_samples=importance,
        jit=jit,
    )
    soy_table, t_soy = ours(soybean, soy, soy_config, **kwargs)
    times = {f"ours SAEM Soybean C={chains}": t_soy}
    soy_frame = pd.DataFrame({"ours": soy_table["estimate"], "ours SE": soy_table["se"]})
    soy_frame.loc["-2LL", "ours"] = soy_table.attrs["-2LL"]
    if version:
        estimate, values, t_pynlme_soy = pynlme_soybean(iterations, chains, seed=1)
        soy_frame["pynlme"] = pd.Series(estimate)
        # Both estimates on the same likelihood: ours, by importance sampling.
        at_pynlme = log_likelihood_at(
            soybean, soy, values, model_kwargs=kwargs, importance_samples=importance
        )
        soy_frame.loc["-2LL (our IS at this estimate)", "ours"] = soy_table.attrs["-2LL"]
        soy_frame.loc["-2LL (our IS at this estimate)", "pynlme"] = at_pynlme.minus_two
        soy_frame["diff/SE"] = (soy_frame["ours"] - soy_frame["pynlme"]) / soy_frame["ours SE"]
        times[f"pynlme saemix Soybean C={chains}"] = t_pynlme_soy
        nlme, nlme_se, nlme_values, t_nlme = pynlme_soybean_nlme()
        soy_frame["pynlme nlme (ML)"] = pd.Series(nlme)
        soy_frame["nlme SE"] = pd.Series(nlme_se)
        soy_frame["ours SE / nlme SE"] = soy_frame["ours SE"] / soy_frame["nlme SE"]
        soy_frame["(ours - nlme) / nlme SE"] = (
            soy_frame["ours"] - soy_frame["pynlme nlme (ML)"]
        ) / soy_frame["nlme SE"]
        at_nlme = log_likelihood_at(
            soybean, soy, nlme_values, model_kwargs=kwargs, importance_samples=importance
        )
        soy_frame.loc["-2LL (our IS at this estimate)", "pynlme nlme (ML)"] = at_nlme.minus_two
        our_se_at_nlme = standard_errors_at(
            soybean, soy, nlme_values, model_kwargs=kwargs, importance_samples=importance
        )
        soy_frame["ours SE at nlme's estimate / nlme SE"] = our_se_at_nlme / soy_frame["nlme SE"]
        times["pynlme nlmefit (ML) Soybean"] = t_nlme
    soy_frame.index.name = "parameter"
    text = (
        f"{SOYBEAN_HEADING} logistic, three correlated random effects per plot, Variety and "
        "Year on every parameter, proportional error\n\n"
        f"Ours and pynlme's saemix: SAEM, iterations {iterations}, {chains} chains, saemix's "
        "kernels (2, 2, 2); pynlme's nlmefit: Lindstrom-Bates ML (R nlme conventions; its -2LL "
        "and SEs are that linearisation's). diff/SE = (ours - pynlme) / our SE. Our SEs hold "
        "the random-effect covariance fixed when it is singular at the estimate, with the "
        "random effects non-centred along its null directions in Louis' formula (see "
        "docs/saem.md), as nlme's SEs of the fixed effects hold the variance parameters fixed. "
        "Last column: our Louis SEs computed at nlme's estimate (same point, exact likelihood "
        "by importance sampling against nlme's linearisation).\n\n" + markdown(soy_frame)
    )
    return text, times


def standard_errors_at(
    model,
    data,
    values,
    *,
    model_kwargs,
    chains: int = 4,
    iterations: int = 300,
    importance_samples: int = 5000,
    fisher_samples: int = 2048,
    seed: int = 0,
) -> pd.Series:
    """Our Louis SEs (natural scale, by reported label) at given population values, computed
    as after a fit (E-step sweeps at those values for the importance proposal, a boundary
    covariance held fixed); ``log_likelihood_at``'s recipe."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        joint = JointModel(model, data, model_kwargs)
        theta = joint.theta_from_values(values)
        plan = mstep.analyse(joint, theta, seed=seed)
        rows = joint.rows(chains)
        target = make_target(joint, theta, rows)
        state = init_e_step(target)
        for _ in range(iterations // 2):
            state, _ = e_step(state, target, "rwm", adapt=True)
        posterior = conditional_run(joint, theta, state, rows, chains, "rwm", iterations, 1)
        proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=seed)
        likelihood = importance_sampling(joint, theta, proposal, importance_samples)
        boundary = fisher.boundary_covariances(joint, theta, plan)
        held = {i for b in boundary for i in b.indices}
        active = torch.tensor([i for i in joint.active_indices().tolist() if i not in held])
        information = fisher.louis_information(
            joint,
            theta,
            proposal,
            likelihood,
            min(fisher_samples, importance_samples),
            indices=active,
            noncentred=fisher.noncentring(joint, boundary),
        )
        report = reported(joint)
        natural = fisher.natural_covariance(information, report.fn, theta, active)
    return pd.Series(natural.covariance.diagonal().sqrt().numpy(), index=report.labels)


def time_section(times: dict) -> str:
    frame = pd.DataFrame({"wall time (s)": times})
    frame.index.name = "run"
    return (
        f"{TIME_HEADING} (whole fit: iterations, standard errors, log-likelihood)\n\n"
        + markdown(frame)
    )


def splice(document: str, section: str, times: dict) -> str:
    """``document`` with the section of the same heading replaced by ``section`` (up to the next
    ``## `` heading) and the wall-time rows of ``times`` replaced or added; the rest (other
    sections, notes written by hand) kept."""
    heading = section.split(":", 1)[0] + ":"
    lines = document.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    lines[start:end] = section.split("\n") + [""]
    rows = {f"| {name} |": f"| {name} | {seconds:.6g} |" for name, seconds in times.items()}
    table_start = next(i for i, line in enumerate(lines) if line.startswith(TIME_HEADING))
    table_end = next(i for i in range(table_start + 4, len(lines)) if not lines[i].startswith("|"))
    kept = [
        line
        for line in lines[table_start + 4 : table_end]
        if not any(line.startswith(key) for key in rows)
    ]
    lines[table_start + 4 : table_end] = kept + list(rows.values())
    return "\n".join(lines)


def run_description(jit: bool, load: tuple[float, float]) -> str:
    """The machine, the measured load and the model's evaluation mode, for the report."""
    threads = torch.get_num_threads()
    busy = max(load) >= os.cpu_count()
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.platform()}), "
        f"torch threads {threads}, load average (1 min) {load[0]:.1f} at the start and "
        f"{load[1]:.1f} at the end of the run ("
        + (
            "other jobs shared the cores: wall times are inflated, only same-run ratios mean "
            "anything"
            if busy
            else "cores not saturated"
        )
        + "). Our model "
        + ("evaluated through a traced graph (`jit=True`)" if jit else "evaluated under Pyro")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--out", default="docs/saem_benchmark.md")
    parser.add_argument("--no-jit", action="store_true", help="evaluate the model under Pyro")
    parser.add_argument(
        "--only",
        choices=("orange", "soybean"),
        help="run one data set and replace its section and wall-time rows in --out, keeping "
        "the rest of the file",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    jit = not args.no_jit
    iterations = (60, 40) if args.quick else (300, 200)
    chains = 2
    importance = 1024 if args.quick else 5000
    version = pynlme_version()
    settings = (iterations, chains, importance, jit, version)
    command = "python benchmarks/saem_orange_soybean.py" + (" --quick" if args.quick else "")
    start_load = os.getloadavg()[0]
    if args.only:
        section, times = (orange_section if args.only == "orange" else soybean_section)(*settings)
        load = (start_load, os.getloadavg()[0])
        section += (
            f"\n\nThis section and its wall-time rows: `{command} --only {args.only}"
            + (f" --threads {args.threads}" if args.threads else "")
            + f"` on {time.strftime('%Y-%m-%d', time.gmtime())}. "
            + run_description(jit, load)
            + "."
        )
        path = Path(args.out)
        text = splice(path.read_text(), section, times)
        path.write_text(text)
        print(section)
        return
    orange_text, orange_times = orange_section(*settings)
    soybean_text, soybean_times = soybean_section(*settings)
    load = (start_load, os.getloadavg()[0])
    versions = package_versions()
    versions["pynlme"] = version or "not installed"
    header = (
        "# SAEM benchmark\n\n"
        f"Written by `{command}`. "
        + run_description(jit, load)
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".\n"
    )
    sections = [orange_text, soybean_text, time_section(orange_times | soybean_times)]
    text = header + "\n" + "\n\n".join(sections) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
