"""Peers fitted on the same data: NumPyro's NUTS on the same models written in NumPyro
(:mod:`.numpyro_models`), pynlme's SAEM (saemix interface) and nlme. Imported only by their
cells (``pip install -e .[bench]``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.compare.datasets import ORANGE_POPULATION, Prepared
from benchmarks.compare.engines import Fit, fit_from_posterior
from benchmarks.compare.metrics import wald_interval


def numpyro_nuts(prepared: Prepared, seed: int, options: dict, dataset: str) -> Fit:
    """NumPyro NUTS (chains one after the other, prior-median start, as our NUTS)."""
    from benchmarks.compare import numpyro_models

    posterior, metrics = numpyro_models.sample(prepared, dataset, seed, **options)
    names = list(dict.fromkeys(label.split("[")[0] for label in prepared.population_truth))
    return fit_from_posterior(prepared, posterior, names, metrics)


def _point_fit(estimate: dict, se: dict, minus_two_ll: float) -> Fit:
    rows = []
    for label in ORANGE_POPULATION:
        s = se.get(label, np.nan)
        lower, upper = wald_interval(estimate[label], s)
        rows.append(
            {
                "label": label,
                "kind": "population",
                "estimate": float(estimate[label]),
                "sd": float(s),
                "lower": float(lower),
                "upper": float(upper),
            }
        )
    return Fit(pd.DataFrame(rows), None, {"minus_two_log_likelihood": float(minus_two_ll)})


def pynlme_saem(prepared: Prepared, seed: int, options: dict, dataset: str) -> Fit:
    """pynlme's saemix, with the adapters of ``benchmarks/saem_orange_soybean.py`` (SEs of the
    fixed effects only; Soybean: -2LL and time only, its labels are not ours)."""
    from benchmarks.saem_orange_soybean import pynlme_orange, pynlme_soybean

    iterations = tuple(options.get("iterations", (300, 200)))
    chains = options.get("chains", 2)
    if dataset == "orange":
        estimate, se, _ = pynlme_orange(iterations, chains, seed)
        return _point_fit(estimate, se, estimate["-2LL"])
    if dataset == "soybean":
        estimate, _, _ = pynlme_soybean(iterations, chains, seed)
        return Fit(pd.DataFrame(), None, {"minus_two_log_likelihood": float(estimate["-2LL"])})
    raise ValueError(f"pynlme-saem runs on orange and soybean, not {dataset!r}")


def pynlme_nlme(prepared: Prepared, seed: int, options: dict, dataset: str) -> Fit:
    """pynlme's R-compatible ``nlme()`` (Lindstrom-Bates, ML) on Orange, R's model
    ``circumference ~ SSlogis(age, Asym, xmid, scal)``, random ``Asym`` per tree."""
    if dataset != "orange":
        raise ValueError(f"pynlme-nlme runs on orange only, not {dataset!r}")
    from pynlme import r

    from pyro_nlme.data.bundled import bundled_path

    frame = pd.read_csv(bundled_path("Orange.csv"))
    fit = r.nlme(
        "circumference ~ SSlogis(age, Asym, xmid, scal)",
        {c: frame[c].to_numpy() for c in frame},
        fixed="Asym + xmid + scal ~ 1",
        random=r.pdDiag("Asym ~ 1"),
        groups="~Tree",
        start={"Asym": 170.0, "xmid": 700.0, "scal": 350.0},
    )
    fixed = r.fixef(fit)
    se = np.sqrt(np.diag(r.vcov(fit)))
    variance = r.VarCorr(fit)
    estimate = {
        "asymptote": fixed["Asym"],
        "inflection": fixed["xmid"],
        "scale": fixed["scal"],
        "asymptote_sd": variance["Asym"]["StdDev"],
        "noise_sd": variance["Residual"]["StdDev"],
    }
    standard_error = dict(zip(("asymptote", "inflection", "scale"), se, strict=True))
    return _point_fit(estimate, standard_error, -2 * r.logLik(fit))
