"""E-step MCMC kernels over the individual latents, one independent chain per row (a row is one
copy of one variety): BlackJAX-style ``init`` / ``step`` functions with NamedTuple states.

Every kernel targets ``p(u_i | y_i, theta)`` through a :class:`Target`, whose ``density``
returns ``log p(y_i, u_i | theta)`` and ``log p(y_i | u_i, theta)`` per row. Acceptance is
decided per row (and per component for the componentwise random walk), so one call moves all
chains of all varieties at once. Randomness comes from torch's global generator (the drivers
seed it).

Kernels (saemix's are the first three; Kuhn & Lavielle 2004, saemix's ``nbiter.mcmc``):

- :func:`prior_step`: independent Metropolis-Hastings proposing from the conditional prior
  ``p(u_i | theta)`` (acceptance = likelihood ratio);
- :func:`componentwise_rw_step`: a Gaussian random walk on one component at a time;
- :func:`block_rw_step`: a Gaussian random walk on all components together;
- :func:`mala_step`: Metropolis-adjusted Langevin with a diagonal preconditioner (autodiff);
- :func:`dense_mala_step`: the same with a dense preconditioner per row (:func:`curvature_root`:
  the inverse of the local curvature of the target, from its Hessian);
- :func:`hmc_step`: Hamiltonian Monte Carlo, a few leapfrog steps (autodiff).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class Target(NamedTuple):
    """What the kernels need from the model at the current population parameters.

    :param density: ``u [N, D] -> (log p(y, u | theta) [N], log p(y | u, theta) [N])``.
    :param sample_prior: ``() -> u [N, D]`` drawn from ``p(u | theta)``.
    """

    density: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    sample_prior: Callable[[], torch.Tensor]


class ChainState(NamedTuple):
    """Position of every chain and its log-densities.

    :param position: ``[N, D]`` unconstrained individual latents.
    :param logdensity: ``[N]`` ``log p(y, u | theta)``.
    :param loglik: ``[N]`` ``log p(y | u, theta)``.
    :param grad: ``[N, D]`` gradient of ``logdensity`` (None until a gradient kernel needs it).
    """

    position: torch.Tensor
    logdensity: torch.Tensor
    loglik: torch.Tensor
    grad: torch.Tensor | None = None


class StepInfo(NamedTuple):
    """:param acceptance: per-row (``[N]``) or per-component (``[N, D]``) acceptance
    probabilities of the step."""

    acceptance: torch.Tensor


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=-torch.inf)


@torch.no_grad()
def init(position: torch.Tensor, target: Target) -> ChainState:
    """The state at ``position`` (no gradient)."""
    logdensity, loglik = target.density(position)
    return ChainState(position, _finite(logdensity), _finite(loglik))


def init_with_grad(position: torch.Tensor, target: Target) -> ChainState:
    """The state at ``position`` with the gradient of the log-density (for MALA and HMC)."""
    logdensity, loglik, grad = _value_and_grad(position, target)
    return ChainState(position, logdensity, loglik, grad)


def _value_and_grad(position: torch.Tensor, target: Target):
    with torch.enable_grad():
        x = position.detach().requires_grad_(True)
        logdensity, loglik = target.density(x)
        (grad,) = torch.autograd.grad(logdensity.sum(), x)
    bad = ~torch.isfinite(logdensity)
    grad = torch.where(bad[:, None] | ~torch.isfinite(grad), torch.zeros_like(grad), grad)
    return _finite(logdensity.detach()), _finite(loglik.detach()), grad


def _accept(log_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probability = torch.exp(torch.clamp(_finite(log_ratio), max=0.0))
    return torch.rand_like(probability) < probability, probability


def _select(accept: torch.Tensor, new: ChainState, old: ChainState) -> ChainState:
    def pick(a, b):
        if a is None or b is None:
            return None
        mask = accept.reshape(accept.shape + (1,) * (a.dim() - accept.dim()))
        return torch.where(mask, a, b)

    return ChainState(*(pick(a, b) for a, b in zip(new, old, strict=True)))


@torch.no_grad()
def prior_step(state: ChainState, target: Target) -> tuple[ChainState, StepInfo]:
    """Independent Metropolis-Hastings from the conditional prior ``p(u_i | theta)``."""
    proposal = init(target.sample_prior(), target)
    accept, probability = _accept(proposal.loglik - state.loglik)
    return _select(accept, proposal._replace(grad=None), state._replace(grad=None)), StepInfo(
        probability
    )


@torch.no_grad()
def componentwise_rw_step(
    state: ChainState, target: Target, scale: torch.Tensor
) -> tuple[ChainState, StepInfo]:
    """A Gaussian random walk on each component in turn (``D`` density evaluations).

    :param scale: ``[N, D]`` proposal SDs.
    """
    acceptance = torch.zeros_like(state.position)
    for d in range(state.position.shape[1]):
        position = state.position.clone()
        position[:, d] += scale[:, d] * torch.randn_like(position[:, d])
        proposal = init(position, target)
        accept, probability = _accept(proposal.logdensity - state.logdensity)
        state = _select(accept, proposal, state._replace(grad=None))
        acceptance[:, d] = probability
    return state, StepInfo(acceptance)


@torch.no_grad()
def block_rw_step(
    state: ChainState, target: Target, scale: torch.Tensor
) -> tuple[ChainState, StepInfo]:
    """A Gaussian random walk on all components at once.

    :param scale: ``[N, D]`` proposal SDs.
    """
    proposal = init(state.position + scale * torch.randn_like(state.position), target)
    accept, probability = _accept(proposal.logdensity - state.logdensity)
    return _select(accept, proposal, state._replace(grad=None)), StepInfo(probability)


def mala_step(
    state: ChainState, target: Target, step_size: torch.Tensor, preconditioner: torch.Tensor
) -> tuple[ChainState, StepInfo]:
    """Metropolis-adjusted Langevin: ``u' = u + eps^2 / 2 M grad + eps sqrt(M) xi``.

    :param step_size: ``[N]`` per-row step sizes ``eps``.
    :param preconditioner: ``[N, D]`` diagonal ``M`` (e.g. squared prior SDs).
    """
    if state.grad is None:
        state = init_with_grad(state.position, target)
    eps = step_size[:, None]
    sqrt_m = preconditioner.sqrt()

    def mean(s: ChainState) -> torch.Tensor:
        return s.position + 0.5 * eps**2 * preconditioner * s.grad

    def log_q(to: torch.Tensor, frm: ChainState) -> torch.Tensor:
        return -0.5 * (((to - mean(frm)) / (eps * sqrt_m)) ** 2).sum(1)

    position = mean(state) + eps * sqrt_m * torch.randn_like(state.position)
    proposal = init_with_grad(position, target)
    log_ratio = (
        proposal.logdensity
        - state.logdensity
        + log_q(state.position, proposal)
        - log_q(proposal.position, state)
    )
    accept, probability = _accept(log_ratio)
    return _select(accept, proposal, state), StepInfo(probability)


def curvature_root(
    position: torch.Tensor, target: Target, floor: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense preconditioner per row from the curvature of the target at ``position``: with
    ``-d2 log p(y_i, u_i) / du_i2 = V diag(lambda) V'`` (``D`` Hessian-vector products; rows are
    independent, so one product per coordinate gives every row's ``D x D`` block), eigenvalues
    replaced by ``max(|lambda|, floor * max |lambda|)``, the preconditioner ``M = V
    diag(1 / lambda) V'`` is the local posterior covariance where the target is log-concave.

    :returns: ``root`` ``[N, D, D]`` with ``M = root @ root'`` and ``inverse_root`` ``[N, D,
        D]`` its inverse.
    """
    n, d = position.shape
    with torch.enable_grad():
        x = position.detach().requires_grad_(True)
        logdensity, _ = target.density(x)
        (grad,) = torch.autograd.grad(logdensity.sum(), x, create_graph=True)
        columns = [
            torch.autograd.grad(grad[:, j].sum(), x, retain_graph=j < d - 1)[0] for j in range(d)
        ]
    hessian = torch.stack(columns, -1).detach()  # [N, D, D]
    hessian = torch.nan_to_num(-0.5 * (hessian + hessian.transpose(1, 2)))
    values, vectors = torch.linalg.eigh(hessian)
    magnitude = values.abs()
    top = magnitude.max(1, keepdim=True).values.clamp(min=1e-300)
    values = torch.maximum(magnitude, floor * top)
    root = vectors / values.sqrt()[:, None, :]
    inverse_root = (vectors * values.sqrt()[:, None, :]).transpose(1, 2)
    return root, inverse_root


def dense_mala_step(
    state: ChainState,
    target: Target,
    step_size: torch.Tensor,
    root: torch.Tensor,
    inverse_root: torch.Tensor,
) -> tuple[ChainState, StepInfo]:
    """Metropolis-adjusted Langevin with a dense preconditioner ``M = root root'`` per row:
    ``u' = u + eps^2 / 2 M grad + eps root xi``.

    :param step_size: ``[N]`` per-row step sizes ``eps``.
    :param root: ``[N, D, D]`` and ``inverse_root`` its inverse (:func:`curvature_root`).
    """
    if state.grad is None:
        state = init_with_grad(state.position, target)
    eps = step_size[:, None]
    preconditioner = root @ root.transpose(1, 2)

    def matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return (matrix @ vector.unsqueeze(-1)).squeeze(-1)

    def mean(s: ChainState) -> torch.Tensor:
        return s.position + 0.5 * eps**2 * matvec(preconditioner, s.grad)

    def log_q(to: torch.Tensor, frm: ChainState) -> torch.Tensor:
        white = matvec(inverse_root, to - mean(frm)) / eps
        return -0.5 * (white**2).sum(1)

    noise = matvec(root, torch.randn_like(state.position))
    proposal = init_with_grad(mean(state) + eps * noise, target)
    log_ratio = (
        proposal.logdensity
        - state.logdensity
        + log_q(state.position, proposal)
        - log_q(proposal.position, state)
    )
    accept, probability = _accept(log_ratio)
    return _select(accept, proposal, state), StepInfo(probability)


def hmc_step(
    state: ChainState,
    target: Target,
    step_size: torch.Tensor,
    preconditioner: torch.Tensor,
    n_leapfrog: int = 5,
) -> tuple[ChainState, StepInfo]:
    """Hamiltonian Monte Carlo with a diagonal inverse mass ``preconditioner`` and
    ``n_leapfrog`` leapfrog steps of size ``step_size`` (``[N]``)."""
    if state.grad is None:
        state = init_with_grad(state.position, target)
    eps = step_size[:, None]
    momentum = torch.randn_like(state.position) / preconditioner.sqrt()
    kinetic = 0.5 * (momentum**2 * preconditioner).sum(1)
    current = state
    p = momentum + 0.5 * eps * current.grad
    for step in range(n_leapfrog):
        position = current.position + eps * preconditioner * p
        current = init_with_grad(position, target)
        if step < n_leapfrog - 1:
            p = p + eps * current.grad
    p = p + 0.5 * eps * current.grad
    new_kinetic = 0.5 * (p**2 * preconditioner).sum(1)
    log_ratio = current.logdensity - new_kinetic - state.logdensity + kinetic
    accept, probability = _accept(log_ratio)
    return _select(accept, current, state), StepInfo(probability)


def adapt_scale(scale: torch.Tensor, acceptance: torch.Tensor, target: float, rate: float):
    """saemix's adaptation of a proposal scale towards an acceptance rate:
    ``scale * (1 + rate * (acceptance - target))``."""
    return scale * (1.0 + rate * (acceptance - target))
