"""Initial estimates of the population-level parameters by a pooled fit.

The weakly informative priors of a model are centred from the scale of the data (e.g. the
largest observed value for an asymptote), which can sit far from the population curve; SVI
started there spends most of its steps sliding along the asymptote / rate / inflection ridge
(docs/svi.md). A pooled fit, as in Monolix's initial estimates, first fits the population
curve to all observations with every individual-level latent at its conditional prior mean:
the maximum of ``log p(y | population, individual = E[individual | population])`` over the
population sites that this likelihood depends on. Sites it does not depend on (the SDs of
the random effects, per-marker effects) keep their prior medians.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.guides.init import init_to_prior_median
from pyro_nlme.infer.util import ModelStructure


class PriorMeans(Messenger):
    """Sets every unobserved latent site without a value to its (conditional) prior mean,
    keeping gradients."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        msg["value"] = msg["fn"].mean
        msg["done"] = True


def pooled_estimates(
    model: Callable,
    data: NLMEData,
    structure: ModelStructure,
    sites: Sequence[str],
    model_kwargs: dict | None = None,
    max_iter: int = 100,
) -> dict[str, torch.Tensor]:
    """Pooled maximum-likelihood values of the population ``sites`` (L-BFGS on their
    unconstrained scale, from their prior medians), with the other population sites at their
    prior medians and the individual-level latents at their conditional prior means.

    :returns: a value per site in ``sites`` whose likelihood gradient is not zero; the others
        are left out (their prior median is the better start). Empty if the fit fails (a
        non-finite likelihood at the prior medians).
    """
    model_kwargs = dict(model_kwargs or {})
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False), poutine.block():
        start_trace = poutine.trace(InitMessenger(init_to_prior_median)(model)).get_trace(
            data, **model_kwargs
        )
    start = {name: start_trace.nodes[name]["value"].detach() for name in structure.population}
    transforms = {name: biject_to(structure.population[name].support) for name in sites}
    free = {name: transforms[name].inv(start[name]).clone().requires_grad_(True) for name in sites}

    def negative_log_likelihood() -> torch.Tensor:
        values = {**start, **{name: transforms[name](u) for name, u in free.items()}}
        with pyro.validation_enabled(False), poutine.block(), PriorMeans():
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                data, **model_kwargs
            )
        return -trace.log_prob_sum(site_filter=lambda name, _: name in structure.observed)

    first = negative_log_likelihood()
    if not math.isfinite(first.item()):
        return {}
    first.backward()
    moved = [name for name, u in free.items() if u.grad is not None and u.grad.abs().sum() > 0]
    if not minimize_lbfgs(list(free.values()), negative_log_likelihood, max_iter, first):
        return {}
    return {name: transforms[name](free[name]).detach() for name in moved}


def minimize_lbfgs(
    parameters: list[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    max_iter: int,
    start_loss: torch.Tensor,
) -> bool:
    """Minimise ``loss_fn`` over ``parameters`` in place by L-BFGS with a strong Wolfe line
    search.

    No tolerances: in float32 the loss changes too little along an asymptote / inflection
    ridge for them, and L-BFGS would stop far from the optimum; it stops when the line search
    makes no progress or after ``max_iter`` iterations.

    :returns: whether the final loss is finite and not above ``start_loss``.
    """
    optimizer = torch.optim.LBFGS(
        parameters,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        last = loss_fn()
    return bool(torch.isfinite(last) and last <= start_loss.detach())
