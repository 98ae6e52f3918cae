"""Conditional modes of the latents and Laplace SDs of the individual ones: where the amortised
guide starts.

An encoder started at the conditional prior means must learn, from the trajectories alone, the
nonlinear map from a curve to its parameters before the population-level factors can move:
on the simulated target design the inflection times of the variety x scenario combinations were
still shrunk twofold towards their scenario means after 1,500 steps (docs/svi.md). The joint mode of
every real-valued latent (individual and population) with the scale parameters (random-effect
SDs, noise) held at their initial values, one L-BFGS run (a penalised nonlinear least-squares
step, as in Lindstrom & Bates), gives every variety its own curve fit to start from and the
population-level genetic values their BLUP-like start; the encoder then learns only the
correction. Without it, genetic values of the kinship form started at 0 stayed near 0 while the
variety x scenario effects absorbed their variance (docs/svi.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.guides.pooled import minimize_lbfgs
from pyro_nlme.infer.util import ModelStructure, is_real_support


class Anchor(NamedTuple):
    """Where an individual site's guide factor starts, per variety: each ``[V, *shape]`` on the
    site's unconstrained scale."""

    loc: torch.Tensor
    """The conditional mode."""
    sd: torch.Tensor
    """The Laplace SD given the population, ``sqrt(diag(H_v^-1))``; NaN where the variety's
    block ``H_v`` of the Hessian is not positive definite."""
    precision: torch.Tensor
    """The conditional precision of each coordinate given all the others, ``diag(H_v)``."""


def conditional_modes(
    model: Callable,
    data: NLMEData,
    structure: ModelStructure,
    init_loc_fn: Callable,
    model_kwargs: dict | None = None,
    max_iter: int = 200,
) -> tuple[dict[str, torch.Tensor], dict[str, Anchor]]:
    """Joint mode of the individual-level latents and the real-valued population-level ones,
    the other population sites (scales, probabilities, ...) held at ``init_loc_fn``'s values:
    L-BFGS on ``-log p(y, free latents | held ones)`` over the free sites' unconstrained
    values, started at ``init_loc_fn``'s values. Holding the scales fixed keeps the mode
    finite (a hierarchical density is unbounded as a random-effect SD goes to 0 with its
    effects). A variety without observations ends at its conditional prior mode.

    :param init_loc_fn: initial values of every site (e.g. pooled estimates for the population,
        prior medians for the rest).
    :returns: the population modes (constrained values, for the guide's initial locations) and
        per individual site its :class:`Anchor` (mode, Laplace SD and conditional precision on
        the unconstrained scale, given the population, :func:`_laplace`) over all ``V``
        varieties of ``data``; both empty if the fit fails (a non-finite density at the start,
        or a final density below the start).
    """
    model_kwargs = dict(model_kwargs or {})
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False), poutine.block():
        start = poutine.trace(InitMessenger(init_loc_fn)(model)).get_trace(data, **model_kwargs)
    population = [
        name for name, info in structure.population.items() if is_real_support(info.support)
    ]
    held = {
        name: start.nodes[name]["value"].detach()
        for name in structure.population
        if name not in population
    }
    latents = {**structure.population, **structure.individual}
    transforms = {
        name: biject_to(latents[name].support) for name in [*population, *structure.individual]
    }
    free = {
        name: transform.inv(start.nodes[name]["value"].detach()).clone().requires_grad_(True)
        for name, transform in transforms.items()
    }

    def negative_log_density() -> torch.Tensor:
        values = {**held, **{name: transforms[name](u) for name, u in free.items()}}
        with pyro.validation_enabled(False), poutine.block():
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                data, **model_kwargs
            )
        log_density = trace.log_prob_sum(site_filter=lambda name, _: name not in held)
        for name, u in free.items():  # the density of the unconstrained values
            log_density = (
                log_density + transforms[name].log_abs_det_jacobian(u, transforms[name](u)).sum()
            )
        return -log_density

    first = negative_log_density()
    if not free or not math.isfinite(first.item()):
        return {}, {}
    if not minimize_lbfgs(list(free.values()), negative_log_density, max_iter, first):
        return {}, {}
    population_modes = {name: transforms[name](free[name]).detach() for name in population}
    individual = {name: free[name] for name in structure.individual}
    laplace = _laplace(individual, negative_log_density)
    anchors = {name: Anchor(u.detach(), *laplace[name]) for name, u in individual.items()}
    return population_modes, anchors


def _laplace(
    individual: dict[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per variety, the SDs of the Laplace approximation of its individual latents given the
    population (``sqrt(diag(H_v^-1))``, ``H_v`` the ``[D, D]`` Hessian of ``loss_fn`` in that
    variety's ``D`` unconstrained values; NaN where a block is not positive definite) and the
    coordinates' conditional precisions (``diag(H_v)``). The varieties are conditionally
    independent, so ``H`` is block-diagonal and ``D`` Hessian-vector products (a unit vector
    in the same coordinate of every variety) give all ``V`` blocks.

    :returns: per site the SDs and the precisions, each ``[V, *shape]``, the shape of its
        unconstrained values.
    """
    if not individual:
        return {}
    tensors = list(individual.values())
    n_varieties = tensors[0].shape[0]
    widths = [tensor[0].numel() for tensor in tensors]
    gradients = torch.autograd.grad(loss_fn(), tensors, create_graph=True)
    columns = []
    for site, width in enumerate(widths):
        for coordinate in range(width):
            directions = [torch.zeros_like(tensor) for tensor in tensors]
            directions[site].view(n_varieties, -1)[:, coordinate] = 1.0
            products = torch.autograd.grad(
                gradients, tensors, grad_outputs=directions, retain_graph=True
            )
            columns.append(torch.cat([p.reshape(n_varieties, -1) for p in products], -1))
    hessian = torch.stack(columns, -1).detach()
    hessian = (hessian + hessian.mT) / 2
    factor, failed = torch.linalg.cholesky_ex(hessian)
    variance = torch.cholesky_inverse(factor).diagonal(dim1=-2, dim2=-1)
    sd = torch.where((failed == 0)[:, None], variance.sqrt(), torch.nan)
    blocks = zip(
        sd.split(widths, dim=-1),
        hessian.diagonal(dim1=-2, dim2=-1).split(widths, dim=-1),
        strict=True,
    )
    return {
        name: (sd_block.reshape(tensor.shape), precision_block.reshape(tensor.shape))
        for (name, tensor), (sd_block, precision_block) in zip(
            individual.items(), blocks, strict=True
        )
    }
