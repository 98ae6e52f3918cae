"""The ``pyro-nlme`` command line: check, simulate, prior, fit, predict."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import arviz as az
import pyro

from pyro_nlme.data import DataError, NLMEData, load_data
from pyro_nlme.infer.stopping import PlateauRule
from pyro_nlme.model.observations import OBSERVATION_MODELS
from pyro_nlme.model.registry import BUILTIN_MODELS, DEFAULT_MODEL, accepts, resolve_model
from pyro_nlme.simulate.phenotypes import TRAITS

LIKELIHOOD_HELP = (
    f"observation model, where the model offers a choice: {', '.join(OBSERVATION_MODELS)} "
    "(ordinal:C for C categories; docs/observation_models.md)"
)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phenotypes", required=True, help="long table (CSV or Parquet)")
    parser.add_argument("--markers", help="genotype table: variety, then one column per marker")
    parser.add_argument("--covariates", help="per-variety covariate table with a variety column")
    parser.add_argument(
        "--covariate-columns", default="", help="comma-separated per-variety covariates to use"
    )
    parser.add_argument(
        "--columns", help="canonical=file column pairs, e.g. variety=Tree,time=age,value=circ"
    )
    parser.add_argument(
        "--impute-markers",
        choices=["none", "mean"],
        default="none",
        help="missing genotypes: an error (none, default) or imputed to the marker mean",
    )


def _load(args: argparse.Namespace) -> NLMEData:
    return load_data(
        args.phenotypes,
        markers=args.markers,
        covariates=args.covariates,
        columns=args.columns,
        covariate_columns=[c for c in args.covariate_columns.split(",") if c],
        impute_missing_markers=args.impute_markers == "mean",
    )


def _model_kwargs(model, args: argparse.Namespace) -> dict:
    """Model options given on the command line (each only where the model takes it)."""
    options = {
        "likelihood": getattr(args, "likelihood", None),
        "marker_form": getattr(args, "marker_form", None),
        "marker_prior": getattr(args, "marker_prior", None),
        "marker_gxe": getattr(args, "marker_gxe", None),
        "parametrization": getattr(args, "parametrization", None),
    }
    kwargs = {}
    for name, value in options.items():
        if value is None:
            continue
        if not accepts(model, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"model {args.model!r} has no option {name!r} ({flag})")
        kwargs[name] = value
    return kwargs


def command_check(args: argparse.Namespace) -> int:
    print(_load(args).summary)
    return 0


def command_simulate(args: argparse.Namespace) -> int:
    from pyro_nlme.simulate import DesignConfig, simulate_design

    config = DesignConfig(
        n_varieties=args.varieties,
        n_heldout=args.heldout,
        n_markers=args.n_markers,
        n_plants=args.plants,
        n_days=args.days,
        trait=args.trait,
    )
    simulated = simulate_design(config, seed=args.seed)
    paths = simulated.write(args.out, marker_format=args.marker_format)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def command_prior(args: argparse.Namespace) -> int:
    from pyro_nlme.diagnostics.prior import prior_predictive_summary

    data = _load(args)
    model, _ = resolve_model(args.model)
    pyro.set_rng_seed(args.seed)
    print(data.summary)
    print()
    table = prior_predictive_summary(model, data, args.draws, **_model_kwargs(model, args))
    print(table.to_string(float_format=lambda x: f"{x:.4g}"))
    return 0


def command_fit(args: argparse.Namespace) -> int:
    data = _load(args)
    print(data.summary, file=sys.stderr)
    model, model_name = resolve_model(args.model)
    model_kwargs = _model_kwargs(model, args)
    common = {"seed": args.seed, "device": args.device, "progress": not args.no_progress}
    if args.method == "svi":
        from pyro_nlme.infer.svi import SVIConfig, fit_svi

        config = SVIConfig(
            guide=args.guide,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            stopping=PlateauRule(min_steps=args.min_steps),
            lr=args.lr,
            lr_decay_steps=args.lr_decay_steps,
            noncentred_sites=tuple(args.noncentred_sites),
            marker_updates=args.marker_updates,
            correlated_events=args.correlated_events,
            correlated_plates=tuple(args.correlated_plates),
            exact_levels=tuple(args.exact_levels),
            variety_offsets=args.variety_offsets,
            num_draws=args.draws,
            checkpoint_every=args.checkpoint_every,
            checkpoint_path=args.checkpoint,
            resume=args.resume,
            **common,
        )
        result = fit_svi(model, data, config, model_name=model_name, model_kwargs=model_kwargs)
    elif args.method == "nuts":
        from pyro_nlme.infer.nuts import NUTSConfig, fit_nuts

        config = NUTSConfig(
            chains=args.chains,
            warmup=args.warmup,
            samples=args.samples,
            noncentred_sites=tuple(args.noncentred_sites),
            **common,
        )
        result = fit_nuts(model, data, config, model_name=model_name, model_kwargs=model_kwargs)
    else:
        from pyro_nlme.infer.saem import MCEMConfig, SAEMConfig, fit_mcem, fit_saem

        if args.method == "saem":
            burn_in, decreasing = (int(k) for k in args.iterations.split(","))
            config = SAEMConfig(
                iterations=(burn_in, decreasing), chains=args.chains, kernel=args.kernel, **common
            )
            fit = fit_saem
        else:
            config = MCEMConfig(kernel=args.kernel, **common)
            fit = fit_mcem
        result = fit(model, data, config, model_name=model_name, model_kwargs=model_kwargs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.inference_data.to_netcdf(str(out))
    print(result.report())
    print(f"wrote {out}")
    return 0


def command_predict(args: argparse.Namespace) -> int:
    from pyro_nlme.diagnostics.prediction import curve_interval_table
    from pyro_nlme.infer.predict import predict_new_varieties

    fit = az.from_netcdf(args.fit)
    prediction = predict_new_varieties(fit, args.markers, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prediction.to_netcdf(str(out))
    print(curve_interval_table(prediction).to_string(max_rows=30))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-nlme",
        description="Nonlinear mixed-effects models of plant growth as Pyro programs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate input tables and print their summary")
    _add_data_arguments(check)
    check.set_defaults(run=command_check)

    simulate = commands.add_parser("simulate", help="simulate the target design")
    simulate.add_argument("--out", required=True, help="output folder")
    simulate.add_argument("--varieties", type=int, default=250)
    simulate.add_argument("--heldout", type=int, default=0, help="genotyped-only varieties")
    simulate.add_argument("--markers", dest="n_markers", type=int, default=60_000)
    simulate.add_argument("--plants", type=int, default=2, help="plants per variety x scenario")
    simulate.add_argument("--days", type=int, default=21)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument(
        "--trait",
        choices=TRAITS,
        default="biomass",
        help="what each image records (docs/simulator.md): log-normal biomass, a count, a "
        "binary, binomial or ordinal trait, or biomass censored below a detection limit",
    )
    simulate.add_argument("--marker-format", choices=["csv", "parquet"], default="csv")
    simulate.set_defaults(run=command_simulate)

    model_help = f"built-in ({', '.join(sorted(BUILTIN_MODELS))}) or path/to/file.py:function"
    prior = commands.add_parser("prior", help="prior predictive summary of a model on a design")
    _add_data_arguments(prior)
    prior.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    prior.add_argument("--likelihood", help=LIKELIHOOD_HELP)
    prior.add_argument("--draws", type=int, default=200)
    prior.add_argument("--seed", type=int, default=0)
    prior.set_defaults(run=command_prior)

    fit = commands.add_parser("fit", help="fit a model; writes an ArviZ InferenceData (netCDF)")
    _add_data_arguments(fit)
    fit.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    fit.add_argument("--likelihood", help=LIKELIHOOD_HELP)
    fit.add_argument(
        "--marker-form",
        choices=["effects", "kinship"],
        help="g2was: marker effects [M x K] or the equivalent kinship (GBLUP) form [V x K]",
    )
    fit.add_argument(
        "--marker-prior",
        choices=[
            "ridge",
            "horseshoe",
            "spike_slab",
            "horseshoe_shared",
            "spike_slab_shared",
            "neural",
        ],
        help="g2was: prior of the marker effects, or a neural covariate model (SVI only)",
    )
    fit.add_argument(
        "--marker-gxe",
        action="store_const",
        const=True,
        help="g2was: add scenario-specific marker effects (genotype x environment)",
    )
    fit.add_argument(
        "--parametrization",
        choices=["noncentred", "centred"],
        help="g2was: sample the random effects (noncentred, the default) or the curve "
        "parameters of each level (centred: suits SVI on well-observed curves, docs/svi.md)",
    )
    fit.add_argument(
        "--noncentred-sites",
        nargs="+",
        default=(),
        metavar="SITE",
        help="svi, nuts: latent sites fitted non-centred whatever the parametrisation (e.g. "
        "genetic_value_component: the weakly informed genetic level, docs/svi.md)",
    )
    fit.add_argument("--method", choices=["svi", "nuts", "saem", "mcem"], default="svi")
    fit.add_argument("--out", required=True, help="InferenceData netCDF file to write")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    svi = fit.add_argument_group("svi")
    svi.add_argument("--guide", choices=["amortized", "normal", "lowrank"], default="amortized")
    svi.add_argument("--batch-size", type=int, default=64, help="varieties per minibatch")
    svi.add_argument("--max-steps", type=int, default=5000)
    svi.add_argument("--lr", type=float, default=0.01)
    svi.add_argument(
        "--min-steps",
        type=int,
        default=PlateauRule.min_steps,
        help="no stop on the ELBO plateau before this many steps: at batch 64 the loss's "
        "noise hides the slow drift of the variance components (docs/svi.md)",
    )
    svi.add_argument(
        "--lr-decay-steps",
        type=int,
        help="steps over which the learning rate decays to its final value, then held "
        "(default: --max-steps)",
    )
    svi.add_argument(
        "--marker-updates",
        choices=["gradient", "cavi"],
        default="gradient",
        help="cavi: spike-and-slab, ridge or horseshoe marker effects by coordinate ascent "
        "(--guide normal, --parametrization centred)",
    )
    svi.add_argument(
        "--variety-offsets",
        action="store_true",
        help="amortised guide: a free per-variety offset of the encoder's outputs "
        "(semi-amortised; docs/svi.md: the variance components unbiased against NUTS)",
    )
    svi.add_argument(
        "--correlated-events",
        action="store_true",
        help="amortised guide: a full covariance over each plant's (each cell's) curve "
        "parameters (docs/svi.md: closer individual-level SDs, a biased plant SD)",
    )
    svi.add_argument(
        "--correlated-plates",
        nargs="*",
        default=[],
        help="with --correlated-events, plates whose cells are correlated too (g2was: plant, "
        "one joint Gaussian over all plants of a variety x scenario)",
    )
    svi.add_argument(
        "--exact-levels",
        nargs="*",
        default=[],
        help="amortised guide: centred Gaussian levels drawn from their exact conditional "
        "given their child level (g2was centred: variety_scenario_parameter)",
    )
    svi.add_argument("--draws", type=int, default=200, help="posterior draws to export")
    svi.add_argument("--checkpoint", help="checkpoint file (written every --checkpoint-every)")
    svi.add_argument("--checkpoint-every", type=int, default=500)
    svi.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    mcmc = fit.add_argument_group("nuts / saem")
    mcmc.add_argument("--chains", type=int, default=4, help="NUTS chains / SAEM E-step chains")
    mcmc.add_argument("--warmup", type=int, default=500)
    mcmc.add_argument("--samples", type=int, default=500)
    mcmc.add_argument("--iterations", default="300,200", help="SAEM: K1,K2 iterations")
    mcmc.add_argument(
        "--kernel",
        choices=("rwm", "mala", "hmc", "dense_mala"),
        default="rwm",
        help="SAEM / MCEM E-step kernel (dense_mala for nested random effects, e.g. g2was)",
    )
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", help="predict curves of new varieties from markers")
    predict.add_argument("--fit", required=True, help="a fit written by pyro-nlme fit")
    predict.add_argument("--markers", required=True, help="genotype table of the new varieties")
    predict.add_argument("--out", required=True, help="InferenceData netCDF file to write")
    predict.add_argument("--seed", type=int, default=0)
    predict.set_defaults(run=command_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"pyro-nlme {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
