"""Standard errors from the observed Fisher information by Louis' formula (Louis 1982)::

    I(theta) = sum_i ( E[-d2 log p(y_i, u_i; theta)] - Cov[d log p(y_i, u_i; theta)] ),

expectations under ``p(u_i | y_i, theta)``, taken variety by variety (varieties are independent
given ``theta``, so no cross terms of zero mean add noise). The expectations are estimated with
the self-normalised importance weights of the log-likelihood's draws (:mod:`.likelihood`):
independent draws, so the Monte-Carlo error is far below that of correlated E-step draws (on
Orange, 4,000 MCMC draws per tree left SEs 3-8% off the exact ones; see ``docs/saem.md``).
This is exactly the Hessian of the importance-sampling log-likelihood at fixed draws.
Derivatives are exact (autodiff, :mod:`.derivatives`) on the unconstrained scale; SEs of
natural-scale quantities follow by the delta method, which at the maximum is the exact change
of variables.

Where a closed-form random-effect covariance is singular at the estimate (Soybean: correlations
of +-0.9998), the maximum is on the boundary of the parameter space and the information is not
positive definite in any parametrisation of that covariance (measured on Soybean: in the
engine's coordinates it has negative eigenvalues; in the coordinates of the covariance matrix
itself eigenvalues of -7e10 to 6e16). :func:`boundary_covariances` detects that case; the
SEs of the other parameters are then computed with the covariance held at its estimate (the
information's sub-block), and the covariance's own SDs and correlations have none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.infer.saem.likelihood import LogLikelihood, Proposal
from pyro_nlme.infer.saem.mstep import Plan

SINGULAR_TOLERANCE = 1e-10
"""Eigenvalues of the information below this fraction of the largest are treated as 0."""


BOUNDARY_EIGENVALUE = 1e-3
"""A random-effect correlation matrix whose smallest eigenvalue is below this is singular."""


def boundary_covariances(joint: JointModel, theta: torch.Tensor, plan: Plan) -> list[tuple]:
    """``(site, smallest eigenvalue of its correlation matrix, theta indices)`` of each
    closed-form covariance that is singular at ``theta`` (:data:`BOUNDARY_EIGENVALUE`)."""
    from pyro_nlme.infer.saem.mstep import covariance_of

    population = {b.name: b for b in joint.population}
    out = []
    for g in plan.full:
        covariance = covariance_of(joint, theta, g)
        sd = covariance.diagonal().sqrt()
        smallest = float(torch.linalg.eigvalsh(covariance / (sd[:, None] * sd[None, :]))[0])
        if smallest < BOUNDARY_EIGENVALUE:
            sites = [population[s] for s in (g.sd_site, g.corr_site, g.chol_site) if s]
            indices = [i for b in sites for i in range(b.offset, b.offset + b.size)]
            out.append((g.site, smallest, indices))
    return out


def louis_information(
    joint: JointModel,
    theta: torch.Tensor,
    proposal: Proposal,
    likelihood: LogLikelihood,
    n_samples: int,
    map_estimate: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Louis' observed information ``[k, k]`` on the unconstrained scale along ``indices`` of
    ``theta`` (all by default), from the first ``n_samples`` importance draws of ``likelihood``
    (their weights renormalised)."""
    n = joint.n_varieties
    indices = torch.arange(joint.theta_dim) if indices is None else indices
    dim = len(indices)
    log_w = likelihood.log_weights[:n_samples]
    weights = torch.softmax(log_w, 0)  # [M, V], self-normalised per variety
    mean_gradient = torch.zeros(n, dim, dtype=joint.dtype)
    outer = torch.zeros(dim, dim, dtype=joint.dtype)
    neg_hessian = torch.zeros(dim, dim, dtype=joint.dtype)
    for chunk in proposal.chunks(n_samples):
        m = chunk.u.shape[0] // n
        w = weights[chunk.start : chunk.start + m].reshape(-1)

        def fn(t, chunk=chunk, w=w):
            total = joint.log_density(t, chunk.u, chunk.rows).total
            return w * total, torch.zeros((), dtype=t.dtype)

        d = derivatives(fn, theta, indices)
        weighted = d.jacobian  # w * gradient, per row
        neg_hessian -= d.hessian[:, indices]
        mean_gradient += weighted.reshape(m, n, dim).sum(0)
        safe = torch.where(w > 0, w, torch.ones_like(w))
        outer += torch.einsum("ri,rj->ij", weighted / safe[:, None], weighted)
    info = neg_hessian - outer + torch.einsum("vi,vj->ij", mean_gradient, mean_gradient)
    if map_estimate:
        prior = derivatives(
            lambda t: (
                torch.zeros(1, dtype=t.dtype),
                joint.log_density(t, chunk.u[:n], joint.rows(1), prior=True).prior,
            ),
            theta,
            indices,
        )
        info -= prior.hessian[:, indices]
    return 0.5 * (info + info.T)


class NaturalCovariance(NamedTuple):
    """:param covariance: ``[p, p]`` of the reported quantities (NaN rows and columns where
        undefined).
    :param singular: ``[p]`` True where the information is singular along the quantity's
        gradient, so that it has no SE.
    :param n_null: dimension of the information's null space (0 when positive definite).
    """

    covariance: torch.Tensor
    singular: torch.Tensor
    n_null: int


def natural_covariance(
    info: torch.Tensor,
    report: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
) -> NaturalCovariance:
    """Covariance of the reported natural-scale quantities ``report(theta)`` by the delta
    method, from the information ``info`` along ``indices`` of ``theta`` (the other elements
    held fixed: a quantity that depends on them has no SE).

    Where the information has eigenvalues at or below :data:`SINGULAR_TOLERANCE` times the
    largest (or negative ones: Monte-Carlo error at a flat direction), its pseudo-inverse is used
    and a quantity keeps its SE only if its gradient is orthogonal to those directions (to
    1e-6 of its norm): an estimable function of the parameters; the others are NaN."""
    values, vectors = torch.linalg.eigh(0.5 * (info + info.T))
    null = values <= SINGULAR_TOLERANCE * values.abs().max().clamp(min=1e-300)
    inverse = vectors[:, ~null] @ torch.diag(1.0 / values[~null]) @ vectors[:, ~null].T
    full = torch.autograd.functional.jacobian(report, theta)
    indices = torch.as_tensor(indices, dtype=torch.long)
    held = torch.ones(theta.numel(), dtype=torch.bool)
    held[indices] = False
    jacobian = full[:, indices]
    covariance = jacobian @ inverse @ jacobian.T
    along_null = (jacobian @ vectors[:, null]).norm(dim=1)
    scale = full.norm(dim=1).clamp(min=1e-300)
    singular = (along_null > 1e-6 * scale) | (full[:, held].norm(dim=1) > 1e-12 * scale)
    covariance[singular, :] = float("nan")
    covariance[:, singular] = float("nan")
    return NaturalCovariance(covariance, singular, int(null.sum()))
