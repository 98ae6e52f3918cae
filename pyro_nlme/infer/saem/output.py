"""From an estimate to a :class:`~pyro_nlme.infer.result.FitResult`: Louis' standard errors,
the importance-sampling log-likelihood, conditional modes and samples, and the export (layout of
the ``point_estimate`` group in ``docs/saem.md``)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import torch
import xarray as xr

from pyro_nlme.export.inference_data import site_dims, to_inference_data
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.saem import field, fisher
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
    offset = joint.offset_rows(rows)
    values, _ = joint.individual_values(z if offset is None else z - offset)
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
    genetic: torch.Tensor | None = None,
    genetic_information: field.GeneticInformation | None = None,
) -> FitResult:
    """Post-process an estimate (module docs).

    :param config: the engine's config (``SAEMConfig`` or ``MCEMConfig``): its ``chains``,
        ``kernel``, ``conditional_iterations``, ``draws``, ``importance_samples``,
        ``fisher_samples``, ``map`` and ``seed`` are used, and it is stored in the settings.
    :param genetic: with a marker field (:mod:`.field`), the estimated ``E[g | y]`` ``[V, K]``
        at which the genetic values are held: the log-likelihood, the SEs and the conditional
        samples are conditional on them, and the marker effects exported are their back-solve.
    :param genetic_information: the genetic block's information
        (:func:`.field.genetic_information`): the genetic SDs' SEs and their Monte-Carlo
        errors come from it.
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
    active = joint.active_indices()
    boundary = fisher.boundary_covariances(joint, theta, plan)
    held = {i for b in boundary for i in b.indices}
    if held:
        active = torch.tensor([i for i in active.tolist() if i not in held])
    information = fisher.louis_information(
        joint,
        theta,
        proposal,
        likelihood,
        min(config.fisher_samples, config.importance_samples),
        config.map,
        active,
        noncentred=fisher.noncentring(joint, boundary),
    )
    report = reported(joint)
    estimate = report.fn(theta).detach()
    natural = fisher.natural_covariance(information, report.fn, theta, active)
    covariance = natural.covariance
    se_mcse = torch.full((len(report.labels),), float("nan"), dtype=covariance.dtype)
    without_se = natural.singular.clone()
    if genetic_information is not None:
        genetic_sd = _genetic_sd_positions(report.fn, theta, plan.marker_field)
        variance, mcse = _genetic_sd_variances(genetic_information, report.fn, theta, genetic_sd)
        covariance[genetic_sd, genetic_sd] = variance
        se_mcse[genetic_sd] = mcse
        without_se[genetic_sd] = variance.isnan()
    se = covariance.diagonal().clamp(min=0).sqrt()
    n_subjects = int(joint.data.phenotyped.sum())
    criteria = information_criteria(likelihood.minus_two, joint.n_parameters, n_subjects)
    warnings = [
        f"the random-effect covariance of {site!r} is singular at the estimate (smallest "
        f"eigenvalue of its correlation matrix {smallest:.1e}): the maximum is on the boundary, "
        "its SDs and correlations have no SE, and the other SEs hold it fixed at its estimate; "
        "a reduced covariance model (fewer random effects or correlations) avoids this"
        for site, smallest, *_ in boundary
    ]
    if natural.n_null and without_se.any():
        undefined = [label for label, s in zip(report.labels, without_se, strict=True) if s]
        warnings.append(
            f"the Fisher information is not positive definite ({natural.n_null} direction(s) "
            "flat or of negative curvature: an estimate on the boundary or not yet at a maximum): "
            "no SE for " + ", ".join(undefined)
        )
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
            "n_parameters": joint.n_parameters,
            "n_subjects": n_subjects,
            "seconds": seconds,
            "closed_form": plan.describe(_theta_labels(joint)),
        }
    )

    # Samples for the exporter: population sites repeated over draws (NOT posterior draws).
    draws = posterior.draws  # [C, K, V, D]
    n_chains, n_draws = draws.shape[:2]
    population = joint.population_values(theta)
    if plan.marker_field is not None:
        population[plan.marker_field.site] = field.marker_effects(plan.marker_field, genetic)
        warnings.append(
            "marker effects are integrated out: -2LL, AIC, BIC and SEs are conditional on the "
            "genetic values at their estimate E[g | y] (not the marginal likelihood); the "
            "genetic SDs' SEs come from the information of the genetic block with the genetic "
            "values integrated out, the other parameters held at their estimates"
            + (
                f" (Monte-Carlo error of the SEs, jackknife over chains: {_listed(se_mcse)})"
                if genetic_information is not None
                else " (genetic_sweeps=0: none)"
            )
        )
    samples = {
        name: value.expand((n_chains, n_draws) + value.shape).to(torch.float32)
        for name, value in population.items()
    }
    samples.update(
        {k: v.to(torch.float32) for k, v in individual_values(joint, theta, draws).items()}
    )
    mode_values = individual_values(joint, theta, modes)
    point = _point_estimate(
        joint, report.labels, estimate, se, covariance, likelihood, criteria, history, mode_values
    )
    point["se_mcse"] = (("parameter",), se_mcse.numpy())
    original = _original_data(joint, plan)
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


def _genetic_sd_positions(report, theta: torch.Tensor, markers: field.MarkerField) -> list[int]:
    """Positions of the reported genetic SDs: the quantities that depend on ``theta`` through
    ``markers.sd_index`` alone."""
    jacobian = torch.autograd.functional.jacobian(report, theta).abs()
    outside = jacobian.clone()
    outside[:, markers.sd_index] = 0
    inside = jacobian[:, markers.sd_index].sum(1)
    return [i for i in range(len(jacobian)) if inside[i] > 0 and not outside[i].any()]


def _genetic_sd_variances(
    information: field.GeneticInformation, report, theta: torch.Tensor, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-method variances of the reported genetic SDs from the genetic block's information,
    and the jackknife Monte-Carlo error of their SEs over the left-out chains."""

    def variances_from(info: torch.Tensor) -> torch.Tensor:
        natural = fisher.natural_covariance(info, report, theta, information.indices)
        return natural.covariance.diagonal()[positions]

    variance = variances_from(information.information)
    n = information.leave_one_chain_out.shape[0]
    if n < 2:
        return variance, torch.full_like(variance, float("nan"))
    left_out = torch.stack(
        [variances_from(info).clamp(min=0).sqrt() for info in information.leave_one_chain_out]
    )
    mcse = ((n - 1) / n * ((left_out - left_out.mean(0)) ** 2).sum(0)).sqrt()
    return variance, mcse


def _listed(values: torch.Tensor) -> str:
    return ", ".join(f"{v:.3g}" for v in values[~values.isnan()].tolist())


def _original_data(joint: JointModel, plan: Plan):
    data = data_as(joint.data, torch.float32)
    if plan.marker_field is not None:
        data = dataclasses.replace(data, markers=plan.marker_field.markers)
    return data


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
        "n_parameters": ((), joint.n_parameters),
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
