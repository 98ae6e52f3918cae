"""The engines on an accelerator: the same model code on ``--device`` and on the CPU.

1. ``log_density``: the log joint density of ``g2was`` and its gradient at one prior draw,
   evaluated on the CPU and on the device (float32 on both), effects and kinship forms:
   relative differences.
2. ``svi``: each guide (amortised, mean-field, low-rank, amortised with correlated events)
   fitted on the device on a small simulated design; the fit is exported, summarised by ArviZ,
   and its curves compared with the true noise-free curves (R^2), its noise SD with the truth.
3. ``predict``: genomic prediction of held-out varieties from the device fit (CPU code).
4. ``cli``: ``pyro-nlme fit --device DEVICE`` on the same design, written to netCDF.
5. ``saem``: SAEM refuses a non-CPU device with a clear error (it runs on the CPU by design).
6. ``throughput``: on the full target design (250 varieties x 60,000 markers), SVI steps/s
   of the amortised guide (batch 64) and the seconds per gradient of NUTS's potential energy,
   on the device and on the CPU in the same process.
7. ``nuts``: two short chains of NUTS on the device (6 varieties, the extended test's design).

Each check writes one JSON line to ``--out`` as it ends (a traceback if it fails), so a run cut
short keeps what it measured; ``--budget-s`` skips checks that would start past the budget.

    python benchmarks/device_check.py --device cuda --out device_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import arviz as az
import pyro
import torch
from pyro import poutine

from pyro_nlme.data import load_data
from pyro_nlme.export import package_versions
from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts
from pyro_nlme.infer.predict import predict_new_varieties
from pyro_nlme.infer.svi import SVIConfig, fit_svi
from pyro_nlme.simulate import DesignConfig, simulate_design
from pyro_nlme_models.g2was import g2was

sys.path.insert(0, str(Path(__file__).parent))
from nuts_target_design import gradient_cost  # noqa: E402

KINSHIP = {"marker_form": "kinship", "parametrization": "centred"}
NONCENTRED = ("genetic_value_component",)


def small_design(n_varieties: int = 30, n_heldout: int = 5, n_markers: int = 2000, seed: int = 3):
    """A simulated design, its training data and the held-out varieties' genotype table."""
    config = DesignConfig(n_varieties=n_varieties, n_heldout=n_heldout, n_markers=n_markers)
    sim = simulate_design(config, seed=seed)
    heldout = sim.truth["heldout"].values
    genotypes = sim.genotype_table()
    return sim, load_data(sim.phenotypes, markers=genotypes[~heldout]), genotypes[heldout]


def check_log_density(data, device: str) -> dict:
    """Log joint density and its gradient at one prior draw, CPU against ``device``, in the
    effects form (60,000-wide marker effects) and the centred kinship form."""
    return {
        form: log_density_agreement(
            data, device, {"marker_form": form, "parametrization": "centred"}
        )
        for form in ("effects", "kinship")
    }


def log_density_agreement(data, device: str, model_kwargs: dict) -> dict:
    pyro.set_rng_seed(0)
    trace = poutine.trace(g2was).get_trace(data, **model_kwargs)
    point = {
        name: site["value"].detach()
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }

    def evaluate(where: str):
        values = {name: value.clone().to(where) for name, value in point.items()}
        real = [value.requires_grad_() for value in values.values() if value.is_floating_point()]
        conditioned = poutine.condition(g2was, data=values)
        log_joint = poutine.trace(conditioned).get_trace(data.to(where), **model_kwargs)
        log_joint = log_joint.log_prob_sum()
        grads = torch.autograd.grad(log_joint, real)
        return log_joint.item(), torch.cat([g.reshape(-1).cpu() for g in grads])

    cpu_value, cpu_grad = evaluate("cpu")
    device_value, device_grad = evaluate(device)
    return {
        "latent_scalars": int(cpu_grad.numel()),
        "log_joint_cpu": cpu_value,
        "log_joint_device": device_value,
        "log_joint_rel_diff": abs(device_value - cpu_value) / abs(cpu_value),
        "grad_max_rel_diff": float(
            ((device_grad - cpu_grad).abs().max() / cpu_grad.abs().max()).item()
        ),
    }


def curve_r2(idata, sim, data) -> float:
    curve = idata.posterior["curve"].mean(("chain", "draw")).values
    truth = sim.truth["noise_free_curve"].sel(variety=data.variety_ids).values
    present = data.plant_mask.numpy()
    fitted, target = curve[present], truth[present]
    return float(1 - ((fitted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def check_svi(sim, data, new, device: str, guide: str, correlated: bool, steps: int) -> dict:
    config = SVIConfig(
        guide=guide,
        correlated_events=correlated,
        batch_size=16,
        max_steps=steps,
        lr=0.02,
        noncentred_sites=NONCENTRED,
        num_draws=100,
        device=device,
        progress=False,
    )
    start = time.perf_counter()
    result = fit_svi(g2was, data, config, model_kwargs=KINSHIP)
    wall = time.perf_counter() - start
    idata = result.inference_data
    summary = az.summary(idata, var_names=["noise_sd", "scenario_mean"], kind="stats")
    row = {
        "guide": guide + (" (correlated events)" if correlated else ""),
        "wall_s": wall,
        "steps": len(result.history),
        "steps_per_s": len(result.history) / result.history["seconds"].iloc[-1],
        "final_loss": float(result.history["loss"].iloc[-1]),
        "curve_r2": curve_r2(idata, sim, data),
        "noise_sd": float(summary.loc["noise_sd", "mean"]),
        "noise_sd_truth": float(sim.truth["noise_sd"]),
        "stored_device": json.loads(idata.posterior.attrs["settings"])["device"],
    }
    if guide == "amortized" and not correlated:
        start = time.perf_counter()
        prediction = predict_new_varieties(idata, new, seed=0)
        row["predict_s"] = time.perf_counter() - start
        row["predict_dims"] = dict(prediction.posterior["curve"].sizes)
    return row


def check_cli(sim, device: str) -> dict:
    from pyro_nlme.cli import main as cli

    with tempfile.TemporaryDirectory() as folder:
        heldout = sim.truth["heldout"].values
        phenotypes, markers = Path(folder, "phenotypes.csv"), Path(folder, "markers.csv")
        sim.phenotypes.to_csv(phenotypes, index=False)
        sim.genotype_table()[~heldout].to_csv(markers, index=False)
        out = Path(folder, "fit.nc")
        argv = [
            "fit",
            "--phenotypes",
            str(phenotypes),
            "--markers",
            str(markers),
            "--method",
            "svi",
            "--max-steps",
            "100",
            "--device",
            device,
            "--no-progress",
            "--out",
            str(out),
        ]
        status = cli(argv)
        idata = az.from_netcdf(str(out))
        return {"exit_status": status, "groups": list(idata.groups())}


def check_nuts(device: str, warmup: int, samples: int) -> dict:
    config = DesignConfig(
        n_varieties=6, n_markers=60, n_plants=1, n_days=21, n_chromosomes=3, missing_rate=0.05
    )
    sim = simulate_design(config, seed=0)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    nuts = NUTSConfig(
        chains=2,
        warmup=warmup,
        samples=samples,
        init_refine_steps=1000,
        reparam=False,
        noncentred_sites=NONCENTRED,
        device=device,
        progress=False,
    )
    start = time.perf_counter()
    fit = fit_nuts(g2was, data, nuts, model_kwargs=KINSHIP)
    idata = fit.inference_data
    r_hat = az.rhat(idata, var_names=["scenario_mean", "noise_sd"])
    return {
        "wall_s": time.perf_counter() - start,
        "chain_wall_s": fit.history["wall_s"].tolist(),
        "divergences": int(idata.sample_stats["diverging"].sum()),
        "max_rhat": float(max(float(r_hat[name].max()) for name in r_hat.data_vars)),
        "noise_sd": float(idata.posterior["noise_sd"].mean()),
        "noise_sd_truth": float(sim.truth["noise_sd"]),
        "warnings": fit.warnings,
    }


def check_throughput(device: str, steps: int) -> list[dict]:
    """SVI steps/s and NUTS s/gradient on the full target design, ``device`` then the CPU."""
    sim, data, _ = small_design(n_varieties=250, n_heldout=0, n_markers=60_000, seed=1)
    rows = []
    for where in (device, "cpu"):
        config = SVIConfig(
            max_steps=steps,
            stopping=None,
            lr=0.02,
            noncentred_sites=NONCENTRED,
            device=where,
            progress=False,
        )
        start = time.perf_counter()
        result = fit_svi(g2was, data, config, model_kwargs=KINSHIP)
        history = result.history
        half = len(history) // 2  # steady state: the second half of the steps
        seconds = history["seconds"].iloc[-1] - history["seconds"].iloc[half - 1]
        cost = gradient_cost(g2was, data.to(where), NONCENTRED, **KINSHIP)
        rows.append(
            {
                "where": where,
                "svi_fit_wall_s": time.perf_counter() - start,
                "svi_steps": len(history),
                "svi_steps_per_s_second_half": (len(history) - half) / seconds,
                "nuts_s_per_gradient": cost["s_per_gradient"],
                "nuts_latent_scalars": cost["latent_scalars"],
            }
        )
    return rows


def check_saem(device: str) -> dict:
    from pyro_nlme.data import load_orange
    from pyro_nlme.infer.saem import SAEMConfig, fit_saem
    from pyro_nlme_models.orange import orange

    try:
        fit_saem(orange, load_orange(), SAEMConfig(device=device, progress=False))
    except ValueError as error:
        return {"refused": True, "message": str(error)}
    return {"refused": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--svi-steps", type=int, default=600)
    parser.add_argument("--throughput-steps", type=int, default=300)
    parser.add_argument("--nuts-warmup", type=int, default=150)
    parser.add_argument("--nuts-samples", type=int, default=150)
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--only", nargs="*", help="run only these checks")
    parser.add_argument("--out", type=Path, default=Path("device_check.jsonl"))
    args = parser.parse_args()
    started = time.perf_counter()
    header = {
        "check": "environment",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "argv": sys.argv[1:],
    }
    args.out.write_text(json.dumps(header) + "\n")
    sim, data, new = small_design()
    checks = {
        "log_density": lambda: check_log_density(data, args.device),
        **{
            f"svi_{guide}{'_correlated' if correlated else ''}": (
                lambda guide=guide, correlated=correlated: check_svi(
                    sim, data, new, args.device, guide, correlated, args.svi_steps
                )
            )
            for guide, correlated in [
                ("amortized", False),
                ("normal", False),
                ("lowrank", False),
                ("amortized", True),
            ]
        },
        "cli": lambda: check_cli(sim, args.device),
        "saem": lambda: check_saem(args.device),
        "throughput": lambda: check_throughput(args.device, args.throughput_steps),
        "nuts": lambda: check_nuts(args.device, args.nuts_warmup, args.nuts_samples),
    }
    for name, run in checks.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            row = {"check": name, "skipped": f"budget spent ({elapsed:.0f} s)"}
        else:
            pyro.clear_param_store()
            start = time.perf_counter()
            try:
                row = {"check": name, "ok": True, "result": run()}
            except Exception:  # noqa: BLE001 - recorded, and the next check runs
                row = {"check": name, "ok": False, "traceback": traceback.format_exc()}
            row["seconds"] = time.perf_counter() - start
        print(json.dumps(row, default=str), flush=True)
        with args.out.open("a") as stream:
            stream.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
