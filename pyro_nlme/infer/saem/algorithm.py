"""The SAEM driver (Delyon, Lavielle & Moulines 1999; Kuhn & Lavielle 2004), as saemix and
Monolix run it, on any model of the project's convention.

Iteration ``k``:

1. **E-step (simulation).** Every chain (``chains`` per variety) moves by one kernel schedule
   (:mod:`.estep`) targeting ``p(u_i | y_i, theta_k)``.
2. **Stochastic approximation.** ``S_k = S_{k-1} + gamma_k (s(u_k) - S_{k-1})`` for the
   sufficient statistics of the closed-form parameters, ``H_k = H_{k-1} + gamma_k (h(u_k) -
   H_{k-1})`` for the complete-data information of the others.
3. **M-step.** Closed form from ``S_k`` (:mod:`.mstep`); a Robbins-Monro Newton step
   ``gamma_k G_k^{-1} grad log p(y, u_k; theta)`` on the rest (Gu & Kong 1998). In the first
   phase ``G_k`` is the current draw's complete-data information and the step is halved until it
   does not decrease the draw's complete-data log-likelihood (a generalised EM step). In the
   second phase ``G`` is Louis' observed information of these parameters, the running mean
   (from iteration ``K1 / 2``) of the complete-data information minus the covariance of the
   per-variety gradients across the chains: with the observed rather than the complete-data
   information as gain, the Robbins-Monro recursion averages its noise at the optimal ``1/k``
   rate even when most of the information is missing (Orange's ``inflection`` and ``scale``:
   about 90%), where the complete-data gain would average it far more slowly.

Step sizes: ``gamma_k = 1`` for the first ``K1`` iterations (exploration; saemix's
``nbiter.saemix[1]``, with simulated annealing of the variances during its first half), then
``gamma_k = 1 / (k - K1 + 1)`` for ``K2`` iterations (``nbiter.saemix[2]``). The kernel scales
adapt during the first phase only.

With marker effects integrated out (:mod:`.field`), ``genetic_sweeps`` further E-step and Gibbs
sweeps at the estimate give the genetic block's information (the genetic SDs' SEs). After the
iterations, an E-step run at the estimate (``conditional_iterations`` sweeps) gives
the conditional means and covariances (the importance-sampling proposal) and the conditional
samples that are exported; then the importance-sampling log-likelihood, Louis' information
(:mod:`.fisher`) and the conditional modes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import pandas as pd
import torch

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.saem import field as marker_field
from pyro_nlme.infer.saem import mstep
from pyro_nlme.infer.saem.common import (
    conditional_run,
    gradient_terms,
    make_target,
    newton_direction,
    reported,
)
from pyro_nlme.infer.saem.estep import KERNELS, EStepState, e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.infer.saem.likelihood import LogLikelihood, Proposal, importance_sampling


@dataclass(frozen=True)
class SAEMConfig:
    """Settings of :func:`fit_saem` (defaults as saemix where it has one).

    :param iterations: ``(K1, K2)``: iterations with step size 1, then with decreasing steps.
    :param chains: E-step chains per variety (saemix's ``nb.chains``).
    :param kernel: ``"rwm"`` (saemix's Metropolis mix), ``"mala"`` or ``"hmc"`` (:mod:`.estep`).
    :param burn_in_sweeps: E-step sweeps at the starting values before the first M-step
        (saemix's ``nbiter.burn``).
    :param map: maximise the posterior (the population sites' priors kept) instead of the
        likelihood; every parameter then takes the gradient path of the M-step.
    :param importance_samples: proposal draws per variety for the log-likelihood.
    :param fisher_samples: importance draws per variety for Louis' information (the first
        ones of the log-likelihood's draws).
    :param conditional_iterations: E-step sweeps at the estimate for the conditional moments
        (the importance proposal) and the exported conditional samples.
    :param draws: conditional draws kept per chain for the export.
    :param genetic_sweeps: with marker effects integrated out (:mod:`.field`), E-step and
        Gibbs sweeps at the estimate whose latents give the genetic block's information, hence
        the genetic SDs' SEs (0: none, and no SE for them).
    :param seed: seeds torch's generator for the whole fit (the global state is restored).
    :param device: ``"cpu"`` only (see :func:`check_device`).
    :param progress: show a progress bar.
    :param init: starting values of population sites (natural scale), by site name; others
        start at their prior median.
    :param jit: evaluate the E-step target through a traced graph of the model
        (:class:`~.joint.JointModel`; 4-5x cheaper per evaluation; for models without
        data-dependent Python control flow).
    """

    iterations: tuple[int, int] = (300, 200)
    chains: int = 2
    kernel: str = "rwm"
    map: bool = False
    importance_samples: int = 5000
    burn_in_sweeps: int = 5
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    fisher_samples: int = 2048
    conditional_iterations: int = 200
    draws: int = 100
    genetic_sweeps: int = 200
    init: Mapping[str, object] | None = field(default=None, hash=False)
    jit: bool = False


class SAEMRun(NamedTuple):
    """The iterations' outcome: the estimate (unconstrained ``theta``), the history of the
    reported parameters (one row per iteration), the E-step state and, with a marker field,
    the stochastic approximation of ``E[g | y]`` ``[V, K]`` and the genetic block's information
    (:mod:`.field`)."""

    theta: torch.Tensor
    history: pd.DataFrame
    state: EStepState
    plan: mstep.Plan
    seconds: float
    genetic: torch.Tensor | None = None
    genetic_information: marker_field.GeneticInformation | None = None


def check_device(device: str) -> None:
    """SAEM and MCEM run on the CPU (their cost is Python overhead per model evaluation, not
    arithmetic, at the sizes they were measured on)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"SAEM and MCEM run on the CPU only; got device={device!r}")


def step_size(k: int, burn_in: int) -> float:
    return 1.0 if k < burn_in else 1.0 / (k - burn_in + 1)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False)


def run_saem(
    joint: JointModel,
    config: SAEMConfig,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> SAEMRun:
    """The SAEM iterations (module docs); the caller seeds the global RNG."""
    if config.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {config.kernel!r}; choose one of {KERNELS}")
    burn_in, decreasing = config.iterations
    start = time.perf_counter()
    theta = joint.initial_theta(config.init)
    plan = mstep.analyse(joint, theta, map_estimate=config.map, seed=config.seed)
    copies = config.chains
    markers = plan.marker_field
    if markers is not None:
        theta = marker_field.start(joint, theta, markers, copies)
    report = reported(joint)
    rows = joint.rows(copies)
    state = init_e_step(make_target(joint, theta, rows))
    for _ in range(config.burn_in_sweeps):
        state, _ = e_step(state, make_target(joint, theta, rows), config.kernel, adapt=True)
    real = joint.real_elements
    n_observed = int(joint.data.mask.sum())
    stats: dict[str, torch.Tensor] | None = None
    averaged = 0
    n_gradient = len(plan.gradient)
    mean_complete = torch.zeros(n_gradient, n_gradient, dtype=joint.dtype)
    mean_missing = torch.zeros_like(mean_complete)
    history = []
    bar = _progress(burn_in + decreasing, config.progress, "SAEM")
    for k in range(burn_in + decreasing):
        gamma = step_size(k, burn_in)
        state, _ = e_step(state, make_target(joint, theta, rows), config.kernel, adapt=k < burn_in)
        u = state.position
        draw = None if markers is None else _redraw_genetic(joint, markers, plan, theta, u, rows)
        if plan.closed_form.numel():
            with torch.no_grad():
                density = joint.log_density(theta, u, rows)
            effects = u if draw is None else u - joint.offset_rows(rows)
            new = mstep.statistics(plan, effects, density, rows, copies, joint.n_varieties)
            if draw is not None:
                new["marker_field:quadratic"] = draw.quadratic
                new["marker_field:mean"] = draw.mean.mean(0)
            if stats is None:
                stats = new
            else:
                stats = {key: s + gamma * (new[key] - s) for key, s in stats.items()}
            theta = mstep.solve(joint, plan, stats, theta, n_observed, anneal=k < burn_in // 2)
        if plan.gradient.numel():
            terms = gradient_terms(joint, theta, u, rows, copies, plan.gradient, config.map)
            gain = terms.neg_hessian
            if k >= burn_in // 2:
                averaged += 1
                mean_complete += (terms.neg_hessian - mean_complete) / averaged
                mean_missing += (terms.missing - mean_missing) / averaged
            if k >= burn_in:
                gain = mean_complete - mean_missing if copies > 1 else mean_complete
            step = gamma * newton_direction(
                gain, terms.gradient, theta[plan.gradient], real[plan.gradient]
            )
            theta = _safe_step(joint, theta, plan.gradient, step, u, rows, k < burn_in, config.map)
        history.append(report.fn(theta).tolist())
        if callback is not None:
            callback(k, theta)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    frame = pd.DataFrame(history, columns=report.labels)
    frame.index.name = "iteration"
    genetic = information = None
    if markers is not None:
        if config.genetic_sweeps:
            draws = []
            for _ in range(config.genetic_sweeps):
                target = make_target(joint, theta, rows)
                state, _ = e_step(state, target, config.kernel, adapt=False)
                u = state.position
                _redraw_genetic(joint, markers, plan, theta, u, rows)
                draws.append(u.reshape(copies, joint.n_varieties, -1))
            information = marker_field.genetic_information(
                markers, plan, joint, theta, torch.stack(draws, 1)
            )
        genetic = stats["marker_field:mean"]
        state = marker_field.fix(joint, markers, state, genetic, copies)
    return SAEMRun(theta, frame, state, plan, time.perf_counter() - start, genetic, information)


def _redraw_genetic(joint, markers, plan, theta, u, rows) -> marker_field.GibbsDraw:
    """Draw every chain's genetic values given its latents ``u`` (:func:`.field.gibbs`) and
    make them the joint model's offset."""
    copies = len(rows.variety) // joint.n_varieties
    z = joint.z_from_u(u, theta, rows)
    draw = marker_field.gibbs(markers, plan, joint, theta, z, copies)
    joint.offset = marker_field.offset(markers, draw.values, joint.z_dim)
    return draw


@torch.no_grad()
def _safe_step(
    joint, theta, indices, step, u, rows, monotone: bool, map_estimate: bool, halvings: int = 20
):
    """``theta`` moved by ``step`` along ``indices``, halved until the complete-data
    log-density of the current draw (plus the log prior for MAP) stays finite and, if
    ``monotone``, does not decrease (a generalised-EM step; kept in place if no halving
    qualifies)."""

    def objective(t):
        density = joint.log_density(t, u, rows, prior=map_estimate)
        return density.total, density.prior

    before = None
    if monotone:
        total, prior = objective(theta)
        before = float(total.sum() + prior)
    for _ in range(halvings):
        candidate = theta.clone()
        candidate[indices] += step
        total, prior = objective(candidate)
        value = float(total.sum() + prior)
        if torch.isfinite(total).all() and math.isfinite(value):
            if before is None or value >= before:
                return candidate
        step = step / 2
    return theta


def settings_of(config) -> dict:
    """A JSON-serialisable copy of a config."""
    out = asdict(config)
    if isinstance(config.iterations, tuple):
        out["iterations"] = list(config.iterations)
    out["init"] = {k: torch.as_tensor(v).tolist() for k, v in (config.init or {}).items()}
    return out


def fit_saem(
    model: Callable,
    data: NLMEData,
    config: SAEMConfig = SAEMConfig(),
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> FitResult:
    """Maximum likelihood (or MAP) by SAEM: estimates, Louis standard errors, the
    importance-sampling log-likelihood with AIC and BIC, conditional modes and samples of the
    individual latents, and the convergence history (see ``docs/saem.md``).

    :param model: a model following the convention (``docs/model_convention.md``).
    :param data: its data.
    :returns: a :class:`~pyro_nlme.infer.result.FitResult` whose InferenceData holds the
        conditional samples in ``posterior`` and the estimates in ``point_estimate``.
    """
    return fit_saem_with_run(model, data, config, model_name=model_name, model_kwargs=model_kwargs)[
        0
    ]


def fit_saem_with_run(
    model: Callable,
    data: NLMEData,
    config: SAEMConfig = SAEMConfig(),
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> tuple[FitResult, JointModel, SAEMRun]:
    """:func:`fit_saem` (same seeding, same result), also returning the joint model (genetic
    values fixed at SAEM's ``E[g | y]``) and the run (final E-step state, estimates, history),
    for diagnostics at the estimate such as a conditional -2 log-likelihood."""
    from pyro_nlme.infer.saem.output import finish

    check_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        joint = JointModel(model, data, model_kwargs, jit=config.jit)
        run = run_saem(joint, config)
        result = finish(
            joint,
            run.theta,
            run.state,
            run.plan,
            run.history,
            engine="saem",
            config=config,
            seconds=run.seconds,
            model_name=model_name,
            genetic=run.genetic,
            genetic_information=run.genetic_information,
        )
    return result, joint, run


def log_likelihood_at(
    model: Callable,
    data: NLMEData,
    values: Mapping[str, object],
    *,
    model_kwargs: Mapping[str, object] | None = None,
    chains: int = 4,
    iterations: int = 300,
    importance_samples: int = 5000,
    seed: int = 0,
) -> LogLikelihood:
    """The importance-sampling log-likelihood at given population values (natural scale, by
    site name; e.g. another program's estimate): E-step sweeps at those values give the
    proposal, as after a fit.

    :param iterations: E-step sweeps (the first half adapting the kernel, then kept).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        joint = JointModel(model, data, model_kwargs)
        theta = joint.theta_from_values(values)
        mstep.analyse(joint, theta, seed=seed)
        rows = joint.rows(chains)
        target = make_target(joint, theta, rows)
        state = init_e_step(target)
        for _ in range(iterations // 2):
            state, _ = e_step(state, target, "rwm", adapt=True)
        posterior = conditional_run(joint, theta, state, rows, chains, "rwm", iterations, 1)
        proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=seed)
        return importance_sampling(joint, theta, proposal, importance_samples)
