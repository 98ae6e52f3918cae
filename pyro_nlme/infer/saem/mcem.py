"""Monte Carlo EM (Wei & Tanner 1990) in the SAEM framework: the same model probing, E-step
kernels, closed-form M-step and post-processing, but each iteration maximises the Monte-Carlo
average of the complete-data log-likelihood over a fresh E-step sample whose size grows
geometrically (``m_k = min(final_samples, ceil(initial_samples * growth ** k))`` sweeps of
every chain), so that the Monte-Carlo error shrinks as the iterates converge (Booth & Hobert
1999). The M-step: the closed-form parameters from the averaged sufficient statistics (EM),
then for the others either one Newton-Raphson step on the Monte-Carlo log-likelihood with
Louis' observed information (``acceleration``, the default) or EM's Newton steps with
backtracking to the argmax of the Monte-Carlo complete-data log-likelihood; alternated twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.saem import mstep
from pyro_nlme.infer.saem.algorithm import _progress, check_device
from pyro_nlme.infer.saem.common import make_target, newton_direction, reported
from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.saem.estep import KERNELS, e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel


@dataclass(frozen=True)
class MCEMConfig:
    """Settings of :func:`fit_mcem`.

    :param iterations: EM iterations.
    :param initial_samples: E-step sweeps per chain kept at the first iteration.
    :param final_samples: the largest number of sweeps per chain.
    :param growth: factor on the number of sweeps from one iteration to the next.
    :param burn_in: sweeps (with kernel adaptation) before the first iteration.
    :param acceleration: the gradient part takes one Newton-Raphson step on the Monte-Carlo
        log-likelihood per iteration (Louis' observed information from the sample: Louis 1982's
        acceleration, McCulloch 1997's MCNR) instead of EM's argmax of the Monte-Carlo
        complete-data log-likelihood, which converges at EM's rate (slow when most of the
        information is missing: about 0.92 per iteration for Orange's ``inflection``). Taken
        only where that information is positive definite; EM's step otherwise.
    :param newton_steps: the most Newton steps of EM's M-step (without ``acceleration``).
    Other parameters as :class:`~pyro_nlme.infer.saem.SAEMConfig`.
    """

    iterations: int = 40
    initial_samples: int = 10
    final_samples: int = 400
    growth: float = 1.2
    burn_in: int = 50
    chains: int = 2
    kernel: str = "rwm"
    map: bool = False
    acceleration: bool = True
    newton_steps: int = 10
    importance_samples: int = 5000
    fisher_samples: int = 2048
    conditional_iterations: int = 200
    draws: int = 100
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    init: Mapping[str, object] | None = field(default=None, hash=False)

    def sample_size(self, k: int) -> int:
        return min(self.final_samples, math.ceil(self.initial_samples * self.growth**k))


ROWS_PER_CHUNK = 20_000


def _chunks(joint: JointModel, samples: torch.Tensor):
    """``samples`` ``[m, C * V, D]`` as (rows, u, copies) chunks of whole copies."""
    n = joint.n_varieties
    flat = samples.reshape(-1, n, samples.shape[-1])
    per_chunk = max(1, ROWS_PER_CHUNK // n)
    for start in range(0, flat.shape[0], per_chunk):
        block = flat[start : start + per_chunk]
        yield joint.rows(block.shape[0]), block.reshape(-1, block.shape[-1]), block.shape[0]


def _statistics(joint, plan, theta, samples):
    total, copies_total = None, 0
    for rows, u, copies in _chunks(joint, samples):
        with torch.no_grad():
            density = joint.log_density(theta, u, rows)
        stats = mstep.statistics(plan, u, density, rows, copies, joint.n_varieties)
        if total is None:
            total = {k: v * copies for k, v in stats.items()}
        else:
            total = {k: total[k] + v * copies for k, v in stats.items()}
        copies_total += copies
    return {k: v / copies_total for k, v in total.items()}


def _objective(joint, theta, samples, map_estimate) -> float:
    value, copies_total = 0.0, 0
    with torch.no_grad():
        for rows, u, copies in _chunks(joint, samples):
            value += float(joint.log_density(theta, u, rows).total.sum())
            copies_total += copies
        if map_estimate:
            rows = joint.rows(1)
            value += copies_total * float(
                joint.log_density(theta, u[: joint.n_varieties], rows, prior=True).prior
            )
    return value / copies_total


def _gradient_terms(joint, theta, samples, indices, map_estimate):
    """Mean gradient, complete-data information and missing information (Louis: the
    per-variety covariance of the gradients over the sample) of the gradient part."""
    n, k = joint.n_varieties, len(indices)
    gradient = torch.zeros(k, dtype=theta.dtype)
    information = torch.zeros(k, k, dtype=theta.dtype)
    per_variety = torch.zeros(n, k, dtype=theta.dtype)
    outer = torch.zeros(k, k, dtype=theta.dtype)
    copies_total = 0
    for rows, u, copies in _chunks(joint, samples):

        def fn(t, rows=rows, u=u):
            return joint.log_density(t, u, rows).total, torch.zeros((), dtype=t.dtype)

        d = derivatives(fn, theta, indices)
        gradient += d.gradient[indices]
        information -= d.hessian[:, indices]
        per_variety += d.jacobian.reshape(copies, n, k).sum(0)
        outer += d.jacobian.T @ d.jacobian
        copies_total += copies
    gradient, information = gradient / copies_total, information / copies_total
    mean = per_variety / copies_total
    missing = (outer - copies_total * mean.T @ mean) / max(copies_total - 1, 1)
    if map_estimate:
        rows = joint.rows(1)
        u = samples.reshape(-1, joint.n_varieties, samples.shape[-1])[0]
        d = derivatives(
            lambda t: (
                torch.zeros(1, dtype=t.dtype),
                joint.log_density(t, u, rows, prior=True).prior,
            ),
            theta,
            indices,
        )
        gradient += d.gradient[indices]
        information -= d.hessian[:, indices]
    return gradient, information, missing


def _newton(joint, plan, theta, samples, config) -> torch.Tensor:
    indices = plan.gradient
    real = joint.real_elements[indices]
    if config.acceleration:
        gradient, information, missing = _gradient_terms(joint, theta, samples, indices, config.map)
        theta = theta.clone()
        theta[indices] += newton_direction(information - missing, gradient, theta[indices], real)
        return theta
    current = _objective(joint, theta, samples, config.map)
    for _ in range(config.newton_steps):
        gradient, information, _ = _gradient_terms(joint, theta, samples, indices, config.map)
        direction = newton_direction(information, gradient, theta[indices], real)
        if float(gradient @ direction) < 1e-10:
            break
        for _ in range(20):
            candidate = theta.clone()
            candidate[indices] += direction
            value = _objective(joint, candidate, samples, config.map)
            if value >= current:
                theta, current = candidate, value
                break
            direction = direction / 2
        else:
            break
    return theta


def run_mcem(joint: JointModel, config: MCEMConfig):
    """The MCEM iterations (module docs); the caller seeds the global RNG."""
    from pyro_nlme.infer.saem.algorithm import SAEMRun

    if config.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {config.kernel!r}; choose one of {KERNELS}")
    start = time.perf_counter()
    theta = joint.initial_theta(config.init)
    plan = mstep.analyse(joint, theta, map_estimate=config.map, seed=config.seed)
    if plan.marker_field is not None:
        raise ValueError(
            f"MCEM does not integrate out marker effects ({plan.marker_field.site!r}): use SAEM"
        )
    report = reported(joint)
    rows = joint.rows(config.chains)
    state = init_e_step(make_target(joint, theta, rows))
    for _ in range(config.burn_in):
        state, _ = e_step(state, make_target(joint, theta, rows), config.kernel, adapt=True)
    n_observed = int(joint.data.mask.sum())
    history, sizes = [], []
    bar = _progress(config.iterations, config.progress, "MCEM")
    for k in range(config.iterations):
        m = config.sample_size(k)
        target = make_target(joint, theta, rows)
        draws = []
        for _ in range(m):
            state, _ = e_step(state, target, config.kernel, adapt=False)
            draws.append(state.position)
        samples = torch.stack(draws)
        if config.acceleration and plan.gradient.numel():
            # The Newton-Raphson step needs the gradient at the parameters the sample is drawn
            # at (Fisher's identity), so it comes first.
            theta = _newton(joint, plan, theta, samples, config)
        for _ in range(1 if config.acceleration else 2):
            if plan.closed_form.numel():
                stats = _statistics(joint, plan, theta, samples)
                theta = mstep.solve(joint, plan, stats, theta, n_observed)
            if plan.gradient.numel() and not config.acceleration:
                theta = _newton(joint, plan, theta, samples, config)
        history.append(report.fn(theta).tolist())
        sizes.append(m)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    frame = pd.DataFrame(history, columns=report.labels)
    frame.index.name = "iteration"
    frame.attrs["sample_size"] = sizes
    return SAEMRun(theta, frame, state, plan, time.perf_counter() - start)


def fit_mcem(
    model: Callable,
    data: NLMEData,
    config: MCEMConfig = MCEMConfig(),
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> FitResult:
    """Maximum likelihood (or MAP) by Monte Carlo EM; outputs as :func:`fit_saem`."""
    from pyro_nlme.infer.saem.output import finish

    check_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        joint = JointModel(model, data, model_kwargs)
        run = run_mcem(joint, config)
        return finish(
            joint,
            run.theta,
            run.state,
            run.plan,
            run.history,
            engine="mcem",
            config=config,
            seconds=run.seconds,
            model_name=model_name,
        )
