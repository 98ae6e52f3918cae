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
of +-0.99999), the maximum is on the boundary of the parameter space and the information is not
positive definite in any parametrisation of that covariance (measured on Soybean: in the
engine's coordinates it has negative eigenvalues; in the coordinates of the covariance matrix
itself eigenvalues of -7e10 to 6e16). :func:`boundary_covariances` detects that case; the
SEs of the other parameters are then computed with the covariance held at its estimate (the
information's sub-block), and the covariance's own SDs and correlations have none.

With the covariance ``Omega`` held, Louis' formula is taken with the latents of that site
*non-centred* with respect to their location parameters (fixed effects, covariate effects
``beta``) along the covariance's null directions. In the E-step's centred coordinates
``u = X beta + eta``, the complete-data information of ``beta`` is ``sum_i X_i' Omega^{-1}
X_i``, unbounded as ``Omega`` becomes singular, and Louis' difference of two such terms is lost
to cancellation (Soybean, smallest correlation eigenvalue 1e-6: diagonal elements of -9e5 for
an information of order 1e2). With ``D = diag(sd)`` and the correlation matrix ``D^{-1} Omega
D^{-1} = Q diag(lambda) Q'``, let ``P = D Q_0 Q_0' D^{-1}`` project onto the directions of
eigenvalue below :data:`BOUNDARY_EIGENVALUE` (``Q_0``); the missing data are taken to be
``w = (I - P) u + P eta``: centred where ``Omega`` has room, non-centred along its null
directions. Then ``beta`` enters the latents' density only through ``(I - P) X beta``
(information ``X' D^{-1} Q_1 diag(1 / lambda_1) Q_1' D^{-1} X``, bounded) and the rest
through ``log p(y | w + P X beta)``, finite for any ``Omega``. Louis' identity holds for any
choice of the missing data (the map from ``eta`` to ``w`` does not depend on the parameters
differentiated), so this is the same observed information of ``log p(y | theta)`` with ``Omega``
fixed. Centring where the random effects are well determined keeps the Monte-Carlo error low:
there most of the complete-data information of ``beta`` about ``eta`` is missing information,
and the fully non-centred difference is noisy (measured on the linear mixed model of
``tests/infer/saem/test_saem_fisher.py``, 1,024 draws per variety: the SEs of ``beta`` varied
by 19-37% from one randomisation of the draws to the next fully non-centred, by below 0.01%
this way; fully centred they were NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.saem.joint import JointModel, Rows
from pyro_nlme.infer.saem.likelihood import LogLikelihood, Proposal
from pyro_nlme.infer.saem.mstep import Plan

SINGULAR_TOLERANCE = 1e-10
"""Eigenvalues of the information below this fraction of the largest are treated as 0."""


BOUNDARY_EIGENVALUE = 1e-3
"""A random-effect correlation matrix whose smallest eigenvalue is below this is singular."""


class Boundary(NamedTuple):
    """A closed-form random-effect covariance that is singular at the estimate.

    :param site: the individual site.
    :param smallest: the smallest eigenvalue of its correlation matrix.
    :param indices: the ``theta`` indices of its SDs and correlations (held fixed).
    :param z_index: ``[E]`` the site's components in the flat latent vector.
    :param projector: ``[E, E]`` ``P = D Q_0 Q_0' D^{-1}`` onto its null directions (module
        docs).
    """

    site: str
    smallest: float
    indices: list[int]
    z_index: torch.Tensor
    projector: torch.Tensor


def boundary_covariances(joint: JointModel, theta: torch.Tensor, plan: Plan) -> list[Boundary]:
    """Each closed-form covariance that is singular at ``theta`` (:data:`BOUNDARY_EIGENVALUE`)."""
    from pyro_nlme.infer.saem.mstep import covariance_of

    population = {b.name: b for b in joint.population}
    out = []
    for g in plan.full:
        covariance = covariance_of(joint, theta, g).detach()
        sd = covariance.diagonal().sqrt()
        values, vectors = torch.linalg.eigh(covariance / (sd[:, None] * sd[None, :]))
        if values[0] < BOUNDARY_EIGENVALUE:
            sites = [population[s] for s in (g.sd_site, g.corr_site, g.chol_site) if s]
            indices = [i for b in sites for i in range(b.offset, b.offset + b.size)]
            null = vectors[:, values < BOUNDARY_EIGENVALUE]
            projector = sd[:, None] * (null @ null.T) / sd[None, :]
            out.append(Boundary(g.site, float(values[0]), indices, g.z_index, projector))
    return out


def noncentring(joint: JointModel, boundary: Sequence[Boundary]) -> torch.Tensor | None:
    """``[D, D]``: the projectors of the boundary covariances on their components of the flat
    latent vector (0 elsewhere), for :func:`louis_information`; None without any."""
    if not boundary:
        return None
    out = torch.zeros(joint.z_dim, joint.z_dim, dtype=joint.dtype)
    for b in boundary:
        out[b.z_index[:, None], b.z_index[None, :]] = b.projector.to(joint.dtype)
    return out


def louis_information(
    joint: JointModel,
    theta: torch.Tensor,
    proposal: Proposal,
    likelihood: LogLikelihood,
    n_samples: int,
    map_estimate: bool = False,
    indices: torch.Tensor | None = None,
    noncentred: torch.Tensor | None = None,
) -> torch.Tensor:
    """Louis' observed information ``[k, k]`` on the unconstrained scale along ``indices`` of
    ``theta`` (all by default), from the first ``n_samples`` importance draws of ``likelihood``
    (their weights renormalised).

    :param noncentred: ``[D, D]`` the projector ``P`` along which the latents are held
        non-centred while the location parameters move (:func:`noncentring`, module docs);
        None: the centred ``u`` held.
    """
    n = joint.n_varieties
    indices = torch.arange(joint.theta_dim) if indices is None else indices
    uncentre = _uncentring(joint, theta, indices, noncentred)
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
            u = chunk.u if uncentre is None else chunk.u + uncentre(t, chunk.rows)
            total = joint.log_density(t, u, chunk.rows).total
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


def _uncentring(
    joint: JointModel,
    theta: torch.Tensor,
    indices: torch.Tensor,
    projector: torch.Tensor | None,
) -> Callable[[torch.Tensor, Rows], torch.Tensor] | None:
    """``(t, rows) -> [N, D]``: the change of the centred latents ``u`` that keeps
    ``w = (I - P) u + P eta`` fixed when the location parameters among ``indices`` move from
    ``theta`` to ``t``: ``P X (t - theta)`` (0 at ``theta``, so the importance draws and
    weights are unchanged); None when there is nothing to move."""
    shift = joint.shift
    if shift is None or projector is None:
        return None
    keep = torch.isin(shift.theta_index, torch.as_tensor(indices))
    if not keep.any():
        return None
    theta_index, z_index, coef = shift.theta_index[keep], shift.z_index[keep], shift.coef[:, keep]

    def change(t: torch.Tensor, rows: Rows) -> torch.Tensor:
        moved = coef[rows.variety] * (t - theta.detach())[theta_index]
        zeros = torch.zeros(len(rows.variety), joint.z_dim, dtype=t.dtype, device=t.device)
        return zeros.index_add(1, z_index, moved) @ projector.T

    return change


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
