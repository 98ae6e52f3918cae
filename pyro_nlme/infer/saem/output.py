"""From an estimate to a :class:`~pyro_nlme.infer.result.FitResult`: Louis' standard errors,
the importance-sampling log-likelihood, conditional modes and samples, and the export (layout of
the ``point_estimate`` group in ``docs/saem.md``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import xarray as xr

from pyro_nlme.export.inference_data import site_dims, to_inference_data
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.saem import fisher
from pyro_nlme.infer.saem.common import (
    conditional_modes,
    conditional_run,
    information_criteria,
    reported,
)
from pyro_nlme.infer.saem.estep import EStepState
from pyro_nlme.infer.saem.joint import JointModel, data_as
from pyro_nlme.infer.saem.likelihood import Proposal, importance_sampling
from pyro_nlme.infer.saem.mstep import Plan
from pyro_nlme.model.convention import model_event_dims

POINT_ESTIMATE = "point_estimate"


def individual_values(joint: JointModel, theta: torch.Tensor, u: torch.Tensor) -> dict:
    """Constrained individual site values ``[..., V, *shape]`` from centred latents
    ``[..., V, D]``."""
    lead = u.shape[:-2]
    n = joint.n_varieties
    copies = math.prod(lead) if lead else 1
    rows = joint.rows(copies)
    z = joint.z_from_u(u.reshape(copies * n, -1), theta, rows)
    values, _ = joint.individual_values(z)
    return {k: v.reshape(lead + (n,) + joint.site_shape(k)) for k, v in values.items()}


def finish(
    joint: JointModel,
    theta: torch.Tensor,
    state: EStepState,
    plan: Plan,
    history: pd.DataFrame,
    *,
    engine: str,
    config,
    seconds: float,
    model_name: str | None,
) -> FitResult:
    """Post-process an estimate (module docs).

    :param config: the engine's config (``SAEMConfig`` or ``MCEMConfig``): its ``chains``,
        ``kernel``, ``conditional_iterations``, ``draws``, ``importance_samples``,
        ``fisher_samples``, ``map`` and ``seed`` are used, and it is stored in the settings.
    """
    from pyro_nlme.infer.saem.algorithm import settings_of

    copies = config.chains
    rows = joint.rows(copies)
    posterior = conditional_run(
        joint,
        theta,
        state,
        rows,
        copies,
        config.kernel,
        config.conditional_iterations,
        config.draws,
    )
    modes = conditional_modes(joint, theta, posterior.mean)
    proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=config.seed)
    likelihood = importance_sampling(joint, theta, proposal, config.importance_samples)
    information = fisher.louis_information(
        joint,
        theta,
        proposal,
        likelihood,
        min(config.fisher_samples, config.importance_samples),
        config.map,
    )
    report = reported(joint)
    estimate = report.fn(theta).detach()
    covariance, _ = fisher.natural_covariance(information, report.fn, theta)
    se = covariance.diagonal().clamp(min=0).sqrt()
    se = torch.where(torch.isfinite(covariance.diagonal()), se, torch.full_like(se, float("nan")))
    n_subjects = int(joint.data.phenotyped.sum())
    criteria = information_criteria(likelihood.minus_two, joint.theta_dim, n_subjects)
    warnings = []
    if not torch.isfinite(se).all():
        warnings.append("the Fisher information is not positive definite: some SEs are NaN")
    if likelihood.mcse > 0.5:
        warnings.append(
            f"the importance-sampling log-likelihood has a Monte-Carlo SE of {likelihood.mcse:.2f}:"
            " raise importance_samples"
        )

    summary = pd.DataFrame(
        {
            "parameter": report.labels,
            "estimate": estimate.numpy(),
            "se": se.numpy(),
            "rse%": (100 * se / estimate.abs()).numpy(),
        }
    )
    summary.attrs.update(
        {
            "-2LL": likelihood.minus_two,
            "-2LL_mcse": 2 * likelihood.mcse,
            "AIC": criteria["aic"],
            "BIC": criteria["bic"],
            "n_parameters": joint.theta_dim,
            "n_subjects": n_subjects,
            "seconds": seconds,
            "closed_form": plan.describe(_theta_labels(joint)),
        }
    )

    # Samples for the exporter: population sites repeated over draws (NOT posterior draws).
    draws = posterior.draws  # [C, K, V, D]
    n_chains, n_draws = draws.shape[:2]
    samples = {
        name: value.expand((n_chains, n_draws) + value.shape).to(torch.float32)
        for name, value in joint.population_values(theta).items()
    }
    samples.update(
        {k: v.to(torch.float32) for k, v in individual_values(joint, theta, draws).items()}
    )
    mode_values = individual_values(joint, theta, modes)
    point = _point_estimate(
        joint, report.labels, estimate, se, covariance, likelihood, criteria, history, mode_values
    )
    original = _original_data(joint)
    idata = to_inference_data(
        joint.model,
        original,
        samples,
        engine=engine,
        settings=settings_of(config),
        seed=config.seed,
        model_name=model_name,
        model_kwargs=joint.model_kwargs,
        extra_groups={POINT_ESTIMATE: point},
    )
    return FitResult(idata, engine, summary, history=history, warnings=warnings)


def _original_data(joint: JointModel):
    return data_as(joint.data, torch.float32)


def _theta_labels(joint: JointModel) -> list[str]:
    labels = []
    for b in joint.population:
        labels += [b.name if b.size == 1 else f"{b.name}[{k}]" for k in range(b.size)]
    return labels


def _point_estimate(
    joint, labels, estimate, se, covariance, likelihood, criteria, history, modes
) -> xr.Dataset:
    event_dims = model_event_dims(joint.model)
    variables = {
        "estimate": (("parameter",), estimate.numpy()),
        "se": (("parameter",), se.numpy()),
        "covariance": (("parameter", "parameter_bis"), covariance.detach().numpy()),
        "minus_two_log_likelihood": ((), likelihood.minus_two),
        "minus_two_log_likelihood_mcse": ((), 2 * likelihood.mcse),
        "aic": ((), criteria["aic"]),
        "bic": ((), criteria["bic"]),
        "n_parameters": ((), joint.theta_dim),
        "importance_samples": ((), likelihood.n_samples),
        "history": (("iteration", "parameter"), history.to_numpy()),
    }
    coords = {
        "parameter": labels,
        "parameter_bis": labels,
        "iteration": np.arange(len(history)),
    }
    for name, value in modes.items():
        info = joint.structure.individual[name]
        dims, squeeze = site_dims(info, event_dims.get(name, ()))
        array = np.squeeze(value.detach().numpy(), axis=tuple(squeeze))
        variables[f"conditional_mode_{name}"] = (tuple(dims), array)
    dataset = xr.Dataset(variables, coords=coords)
    if "variety" in dataset.dims:
        dataset = dataset.assign_coords(variety=list(joint.data.variety_ids))
    return dataset
