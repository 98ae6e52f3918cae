"""The exact posterior of the population parameters of a linear-random-asymptote model
(``models/orange.py``): the model's own priors times the closed-form marginal likelihood
(:func:`~pyro_nlme.reference.linear_random_asymptote.marginal_log_likelihood`), a density in
five dimensions, integrated by importance sampling."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import scipy.optimize
import torch
from torch.func import vmap

from pyro_nlme.data import NLMEData
from pyro_nlme.reference.linear_random_asymptote import PARAMETERS, marginal_log_likelihood

POSITIVE = torch.tensor([False, False, True, True, True])
QUANTILE_PROBS = (0.05, 0.25, 0.5, 0.75, 0.95)
"""The probabilities at which :func:`exact_posterior` gives each marginal's quantiles."""


@dataclass(frozen=True)
class ExactPosterior:
    """Moments and mode of the exact posterior, natural scale, in :data:`PARAMETERS` order.

    :param mean: posterior means ``[5]``.
    :param sd: posterior SDs ``[5]``.
    :param mean_se: importance-sampling standard errors of the means ``[5]``.
    :param mode: the posterior mode (MAP) on the natural scale ``[5]``.
    :param importance_ess: effective sample size of the importance weights.
    :param quantiles: ``[len(QUANTILE_PROBS), 5]`` the marginals' quantiles at
        :data:`QUANTILE_PROBS`.
    :param quantile_se: ``[len(QUANTILE_PROBS), 5]`` their importance-sampling standard
        errors: half the distance between the quantiles at ``p -+ se(F)``, where ``se(F) =
        sqrt(sum w_i ** 2 (1[x_i <= q_p] - p) ** 2)`` is the standard error of the
        self-normalised estimate of the CDF at ``q_p``.

    The SDs of ``asymptote`` and ``asymptote_sd`` are poor checks of a sampler: under the
    HalfCauchy prior with 5 trees the posterior of ``asymptote_sd`` has a tail of about
    ``sd ** -6`` (prior ``sd ** -2`` times the likelihood of 5 group effects, ``sd ** -4``), so
    their fourth moments barely exist and estimates of their SDs scatter widely: over seeds
    0-3 with 40,000 importance draws, the asymptote's SD came out 27.4-32.1; with 400,000,
    27.2-28.4. Their quantiles are estimated as well as any others.
    """

    names: tuple[str, ...]
    mean: np.ndarray
    sd: np.ndarray
    mean_se: np.ndarray
    mode: np.ndarray
    importance_ess: float
    quantiles: np.ndarray
    quantile_se: np.ndarray


def _natural(u: torch.Tensor) -> torch.Tensor:
    return torch.where(POSITIVE, torch.where(POSITIVE, u, 0.0).exp(), u)


def _minimise(function: Callable, start: np.ndarray) -> torch.Tensor:
    def objective(x):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        loss = -function(xt)
        return loss.item(), torch.autograd.grad(loss, xt)[0].numpy()

    result = scipy.optimize.minimize(objective, start, jac=True, method="BFGS")
    return torch.tensor(result.x, dtype=torch.float64)


def exact_posterior(
    model: Callable, data: NLMEData, n_draws: int = 400_000, seed: int = 0
) -> ExactPosterior:
    """Exact posterior of :data:`PARAMETERS` under ``model``'s priors (read off one trace, in
    float64): the mode by BFGS on the natural scale; means and SDs by self-normalised importance
    sampling from a Student-t(4) at the mode of the unconstrained posterior (log scale for the
    three positive parameters) with 1.5 times its inverse-Hessian covariance.

    :param model: a model with the sites :data:`PARAMETERS` (``models/orange.py``).
    :param n_draws: importance draws (400,000: importance ESS about 115,000 on Orange, 3-5 s).
    :param seed: seeds the draws; the global RNG state is untouched.
    """
    trace = pyro.poutine.trace(model).get_trace(data)
    priors = {}
    for name in PARAMETERS:
        fn = trace.nodes[name]["fn"]
        priors[name] = type(fn)(**{k: getattr(fn, k).double() for k in fn.arg_constraints})

    def log_posterior(theta: torch.Tensor) -> torch.Tensor:
        log_prior = sum(priors[n].log_prob(theta[..., i]) for i, n in enumerate(PARAMETERS))
        return log_prior + marginal_log_likelihood(theta, data)

    def unconstrained_log_posterior(u: torch.Tensor) -> torch.Tensor:
        return log_posterior(_natural(u)) + u[POSITIVE].sum()

    start = np.array([200.0, 700.0, math.log(350.0), math.log(30.0), math.log(8.0)])
    mode = _natural(_minimise(lambda u: log_posterior(_natural(u)), start))
    centre = _minimise(unconstrained_log_posterior, start)
    hessian = torch.autograd.functional.hessian(lambda u: -unconstrained_log_posterior(u), centre)
    proposal = dist.MultivariateStudentT(
        torch.tensor(4.0, dtype=torch.float64),
        centre,
        torch.linalg.cholesky(1.5 * torch.linalg.inv(hessian)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = proposal.sample((n_draws,))
    weights = torch.softmax(vmap(unconstrained_log_posterior)(u) - proposal.log_prob(u), 0)
    theta = _natural(u)
    mean = (weights[:, None] * theta).sum(0)
    sd = (weights[:, None] * (theta - mean) ** 2).sum(0).sqrt()
    ess = 1.0 / (weights**2).sum()
    quantiles, quantile_se = _weighted_quantiles(theta, weights, torch.tensor(QUANTILE_PROBS))
    return ExactPosterior(
        names=tuple(PARAMETERS),
        mean=mean.numpy(),
        sd=sd.numpy(),
        mean_se=(sd / ess.sqrt()).numpy(),
        mode=mode.numpy(),
        importance_ess=float(ess),
        quantiles=quantiles.numpy(),
        quantile_se=quantile_se.numpy(),
    )


def _weighted_quantiles(
    theta: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles ``[P, D]`` of each column of ``theta [N, D]`` under normalised ``weights [N]``
    at ``probs [P]``, and their standard errors (:class:`ExactPosterior`)."""
    order = theta.argsort(0)  # [N, D]
    ordered, cdf = theta.gather(0, order), weights[order].cumsum(0)

    def quantile(p: torch.Tensor) -> torch.Tensor:  # [P, D] -> [P, D]
        index = torch.searchsorted(cdf.T.contiguous(), p.clamp(0, 1).T.contiguous())
        return ordered.gather(0, index.T.clamp(max=len(theta) - 1))

    probs = probs.to(theta)[:, None].expand(-1, theta.shape[1])
    value = quantile(probs)
    below = (theta[None] <= value[:, None]).to(theta)  # [P, N, D]
    cdf_se = ((weights[None, :, None] * (below - probs[:, None])) ** 2).sum(1).sqrt()
    se = (quantile(probs + cdf_se) - quantile(probs - cdf_se)) / 2
    return value, se
