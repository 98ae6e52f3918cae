"""Cost of one SVI step on the simulated target design, per guide: median milliseconds over
repeated blocks of steps, all guides in the same process (same machine state).

    python benchmarks/svi_step_cost.py --markers 60000 --steps 20 --repeats 5 \
        --marker-form kinship --parametrization centred
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import zero_grads

from pyro_nlme.data import load_data
from pyro_nlme.infer.guides import build_guide
from pyro_nlme.infer.svi import SVIConfig, _optimizer, noncentred
from pyro_nlme.infer.util import model_structure
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import PARAMETRIZATIONS, g2was

VARIANTS = {
    "amortized (marker features)": ("amortized", {"use_markers": True}),
    "amortized (no markers)": ("amortized", {"use_markers": False}),
    "normal (mean-field)": ("normal", {}),
}


def step_cost_ms(
    data, guide_kind: str, options: dict, model_kwargs: dict, batch: int, steps: int, repeats: int
):
    pyro.clear_param_store()
    structure = model_structure(g2was, data, **model_kwargs)
    model = noncentred(g2was, structure)
    guide_structure = model_structure(model, data, **model_kwargs)
    guide = build_guide(guide_kind, model, data, guide_structure, **options)
    elbo, optim = Trace_ELBO(), _optimizer(SVIConfig())
    kwargs = {"subsample_size": batch, **model_kwargs}

    def step() -> None:
        with poutine.trace(param_only=True) as capture:
            elbo.loss_and_grads(model, guide, data, **kwargs)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        optim(params)
        zero_grads(params)

    timings = []
    with pyro.validation_enabled(False):
        guide(data, **kwargs)
        for _ in range(3):
            step()
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(steps):
                step()
            timings.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--varieties", type=int, default=250)
    parser.add_argument("--markers", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--marker-form", choices=("effects", "kinship"), default="kinship")
    parser.add_argument("--parametrization", choices=PARAMETRIZATIONS, default="centred")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = {"marker_form": args.marker_form, "parametrization": args.parametrization}
    sim = simulate_design(DesignConfig(n_varieties=args.varieties, n_markers=args.markers), 1)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    baseline = None
    print("| guide | ms/step (median) | ratio to mean-field |")
    print("|---|---|---|")
    rows = []
    for label, (kind, options) in VARIANTS.items():
        cost = step_cost_ms(
            data, kind, options, model_kwargs, args.batch_size, args.steps, args.repeats
        )
        rows.append((label, cost))
        if kind == "normal":
            baseline = cost
    for label, cost in rows:
        print(f"| {label} | {cost:.1f} | {cost / baseline:.2f} |")


if __name__ == "__main__":
    main()
