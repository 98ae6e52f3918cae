"""Pieces SAEM and MCEM share: the E-step target at given parameters, the Newton step of the
gradient part of the M-step, the natural-scale parameters that are reported, and the
post-processing of a fit (Louis' standard errors, importance-sampling likelihood, conditional
modes and samples)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import constraints

from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.saem.estep import EStepState, e_step
from pyro_nlme.infer.saem.joint import JointModel, Rows
from pyro_nlme.infer.saem.kernels import Target
from pyro_nlme.model.convention import model_coords, model_event_dims

TRUST_RADIUS = 3.0
"""Largest length of one Newton step of the gradient part, in the metric of the information
(in complete-data standard errors), per parameter: ``sqrt(step' H step) <= 3 sqrt(k)``."""


def make_target(joint: JointModel, theta: torch.Tensor, rows: Rows) -> Target:
    """The E-step target at ``theta`` on ``rows`` (through the traced graph if
    ``joint.jit``)."""
    if joint.jit:
        compiled = joint.compiled_density(rows, theta)
        offset = joint.offset_rows(rows)
        inputs = () if offset is None else (offset,)

        def density(u):
            return compiled(theta, u, *inputs)

        return Target(density, lambda: joint.sample_prior(theta, rows))

    def density(u):
        d = joint.log_density(theta, u, rows)
        return d.total, d.obs

    return Target(density, lambda: joint.sample_prior(theta, rows))


def newton_direction(
    hessian: torch.Tensor, gradient: torch.Tensor, theta: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """``H^{-1} g`` for a (stochastic-approximation) information ``H``, with eigenvalues
    floored so that the step is an ascent direction, its length capped in the metric of ``H``
    (:data:`TRUST_RADIUS`), and each element's change capped at ``0.5 max(1, |theta_a|)`` for
    a real parameter and 0.5 on the unconstrained scale of the others (``theta``, ``real``: the
    current values and kinds of the same elements)."""
    values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    floor = max(float(values.abs().max()) * 1e-8, 1e-10)
    values = values.clamp(min=floor)
    step = vectors @ ((vectors.T @ gradient) / values)
    length = float((step @ (vectors @ (values * (vectors.T @ step)))).sqrt())
    radius = TRUST_RADIUS * len(step) ** 0.5
    if length > radius:
        step = step * (radius / length)
    cap = torch.where(real, 0.5 * theta.abs().clamp(min=1.0), torch.full_like(theta, 0.5))
    ratio = float((step.abs() / cap).max()) if len(step) else 0.0
    return step / ratio if ratio > 1 else step


class GradientTerms(NamedTuple):
    """Along the gradient-part indices ``k``: ``gradient`` ``[k]`` and ``neg_hessian``
    ``[k, k]`` of ``log p(y, u; theta)`` averaged over the chains (plus the log prior for
    MAP), and ``missing`` ``[k, k]``: ``sum_i Cov_chains(grad log p(y_i, u_i; theta))``, the
    missing information of Louis' formula estimated across the chains (0 with one chain)."""

    gradient: torch.Tensor
    neg_hessian: torch.Tensor
    missing: torch.Tensor


def gradient_terms(
    joint: JointModel,
    theta: torch.Tensor,
    u: torch.Tensor,
    rows: Rows,
    n_copies: int,
    indices: torch.Tensor,
    map_estimate: bool,
) -> GradientTerms:
    """The derivatives of the gradient part of the M-step (:class:`GradientTerms`)."""

    def fn(t):
        density = joint.log_density(t, u, rows, prior=map_estimate)
        prior = density.prior
        return density.total / n_copies, prior

    d = derivatives(fn, theta, indices)
    per_row = (d.jacobian * n_copies).reshape(n_copies, joint.n_varieties, -1)
    if n_copies > 1:
        centred = per_row - per_row.mean(0)
        missing = torch.einsum("cvi,cvj->ij", centred, centred) / (n_copies - 1)
    else:
        missing = torch.zeros(len(indices), len(indices), dtype=theta.dtype)
    return GradientTerms(d.gradient[indices], -d.hessian[:, indices], missing)


# -- reported parameters ----------------------------------------------------------------------


def _labels(names: tuple[str, ...], coords: dict, shape: tuple[int, ...]) -> list[str]:
    axes = []
    for position, size in enumerate(shape):
        name = names[position] if position < len(names) else None
        labels = coords.get(name) if name else None
        axes.append(
            [str(x) for x in labels]
            if labels and len(labels) == size
            else [str(i) for i in range(size)]
        )
    out = [""]
    for axis in axes:
        out = [f"{a},{b}" if a else b for a in out for b in axis]
    return out


class Reported(NamedTuple):
    """The natural-scale quantities reported per parameter: each site's value, and for a
    correlation Cholesky factor the correlations below the diagonal."""

    labels: list[str]
    fn: Callable[[torch.Tensor], torch.Tensor]


def reported(joint: JointModel) -> Reported:
    event_dims = model_event_dims(joint.model)
    coords = model_coords(joint.model, joint.data)
    labels, pieces = [], []
    for b in joint.population:
        if b.name in joint.integrated_sites:
            continue
        names = event_dims.get(b.name, ())
        names = names[-len(b.shape) :] if b.shape else ()
        if b.support is constraints.corr_cholesky:
            k = b.shape[-1]
            rows, cols = torch.tril_indices(k, k, offset=-1)
            cell = _labels(names, coords, b.shape)
            labels += [
                f"{b.name}[{cell[int(i) * k + int(j)]}]" for i, j in zip(rows, cols, strict=True)
            ]
            pieces.append((b, (rows, cols)))
        else:
            cells = _labels(names, coords, b.shape) if b.shape else [""]
            labels += [f"{b.name}[{c}]" if c else b.name for c in cells]
            pieces.append((b, None))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        out = []
        for b, tril in pieces:
            value = b.transform(theta[b.indices].reshape(b.unconstrained_shape))
            if tril is not None:
                corr = value @ value.transpose(-1, -2)
                out.append(corr[tril[0], tril[1]])
            else:
                out.append(value.reshape(-1))
        return torch.cat(out)

    return Reported(labels, fn)


# -- after the fit ----------------------------------------------------------------------------


class Posterior(NamedTuple):
    """What the E-step run at ``theta_hat`` gives.

    :param draws: ``[C, K, V, D]`` centred latents, ``K`` kept draws per chain.
    :param mean: ``[V, D]`` conditional means; ``covariance`` ``[V, D, D]`` (all sweeps).
    :param state: the final E-step state.
    """

    draws: torch.Tensor
    mean: torch.Tensor
    covariance: torch.Tensor
    state: EStepState


@torch.no_grad()
def conditional_run(
    joint: JointModel,
    theta: torch.Tensor,
    state: EStepState,
    rows: Rows,
    n_copies: int,
    kernel: str,
    iterations: int,
    keep: int,
) -> Posterior:
    """E-steps at fixed ``theta``: conditional moments and draws (``keep`` per chain, evenly
    spaced)."""
    target = make_target(joint, theta, rows)
    n = joint.n_varieties
    every = max(1, iterations // max(keep, 1))
    kept, all_draws = [], []
    for k in range(iterations):
        state, _ = e_step(state, target, kernel, adapt=False)
        u = state.position.reshape(n_copies, n, -1)
        all_draws.append(u)
        if (k + 1) % every == 0 and len(kept) < keep:
            kept.append(u)
    stacked = torch.stack(all_draws, 1).reshape(-1, n, joint.z_dim)
    mean = stacked.mean(0)
    centred = stacked - mean
    covariance = torch.einsum("kvi,kvj->vij", centred, centred) / (stacked.shape[0] - 1)
    return Posterior(torch.stack(kept, 1), mean, covariance, state)


def conditional_modes(joint: JointModel, theta: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``[V, D]`` modes of ``p(u_i | y_i, theta)`` (L-BFGS; varieties are independent)."""
    rows = joint.rows(1)
    u = start.detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [u], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = -joint.log_density(theta, u, rows).total.sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return u.detach()


def information_criteria(
    minus_two_ll: float, n_parameters: int, n_subjects: int
) -> dict[str, float]:
    """saemix's AIC and BIC: ``-2LL + 2 p`` and ``-2LL + log(N) p`` with ``N`` the number of
    varieties with data and ``p`` the number of free population parameters."""
    return {
        "aic": minus_two_ll + 2 * n_parameters,
        "bic": minus_two_ll + math.log(max(n_subjects, 1)) * n_parameters,
    }
