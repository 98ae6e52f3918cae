"""First and second derivatives of per-row log-densities with respect to the population
parameters, by reverse-mode autodiff only (no ``vmap``, so any Pyro model works).

Per-row gradients come from the double-backward trick: with ``s(w) = sum_r w_r l_r(theta)``,
``G(w) = ds/dtheta`` is linear in ``w`` and ``d G_a / d w = (d l_r / d theta_a)_r``. One
backward pass through ``G_a`` gives row ``a`` of the Hessian of ``sum_r l_r`` and column
``a`` of the per-row Jacobian together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class Derivatives(NamedTuple):
    """:param value: ``[N]`` per-row values.
    :param gradient: ``[d]`` gradient of the total.
    :param hessian: ``[k, d]`` rows ``indices`` of the Hessian of the total.
    :param jacobian: ``[N, k]`` per-row gradients along ``indices``.
    """

    value: torch.Tensor
    gradient: torch.Tensor
    hessian: torch.Tensor
    jacobian: torch.Tensor


def derivatives(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
) -> Derivatives:
    """Derivatives of ``fn(theta) = (per-row values [N], shared scalar)``; the total is
    ``per_row.sum() + shared`` (the shared term, e.g. a log prior, enters the gradient and the
    Hessian but not the per-row Jacobian).

    :param indices: which Hessian rows and Jacobian columns to compute (``k`` backward passes).
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    with torch.enable_grad():
        x = theta.detach().requires_grad_(True)
        per_row, shared = fn(x)
        weight = torch.ones_like(per_row, requires_grad=True)
        total = (per_row * weight).sum() + shared
        (gradient,) = torch.autograd.grad(total, x, create_graph=True)
        hessian = torch.zeros(len(indices), x.numel(), dtype=x.dtype)
        jacobian = torch.zeros(per_row.numel(), len(indices), dtype=x.dtype)
        for k, a in enumerate(indices.tolist()):
            if not gradient[a].requires_grad:
                continue
            h, j = torch.autograd.grad(
                gradient[a], (x, weight), retain_graph=True, allow_unused=True
            )
            if h is not None:
                hessian[k] = h
            if j is not None:
                jacobian[:, k] = j
    return Derivatives(per_row.detach(), gradient.detach(), hessian, jacobian)
