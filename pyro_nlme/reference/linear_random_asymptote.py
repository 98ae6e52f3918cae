"""Exact maximum likelihood of the logistic model with an additive random asymptote (the Orange
model, ``models/orange.py``).

Since ``y_i = (asymptote + b_i) * s_i + e_i`` with ``s_i = sigmoid((t_i - inflection) / scale)``,
``b_i ~ Normal(0, asymptote_sd)`` and ``e_i ~ Normal(0, noise_sd I)``, the marginal distribution
of a tree's measurements is Gaussian in closed form:
``y_i ~ MultivariateNormal(asymptote * s_i, asymptote_sd**2 s_i s_i^T + noise_sd**2 I)``.
This is the exact likelihood (nlme's Lindstrom-Bates fit is a linearisation of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

from pyro_nlme.data import NLMEData

PARAMETERS = ("asymptote", "inflection", "scale", "asymptote_sd", "noise_sd")
_POSITIVE = (False, False, True, True, True)


def marginal_log_likelihood(params: torch.Tensor, data: NLMEData) -> torch.Tensor:
    """Exact marginal log-likelihood, by the matrix determinant lemma and Sherman-Morrison
    (``cov = noise_sd**2 I + asymptote_sd**2 s s^T``), vectorised over trees.

    :param params: ``[5]`` = (asymptote, inflection, scale, asymptote_sd, noise_sd), natural
        scale (the last three > 0).
    :param data: one plant per variety (tree) and one scenario.
    :returns: scalar log L, float64.
    """
    if data.n_scenarios != 1 or data.n_plants != 1:
        raise ValueError("exact reference: one scenario and one plant per variety only")
    asymptote, inflection, scale, asymptote_sd, noise_sd = params.double()
    mask = data.mask[:, 0, 0].double()
    times = data.times[:, 0, 0].double()
    shape = torch.sigmoid((times - inflection) / scale) * mask
    residual = (data.values[:, 0, 0].double() - asymptote * shape) * mask
    n = mask.sum(-1)
    noise_var, effect_var = noise_sd**2, asymptote_sd**2
    s_s = (shape * shape).sum(-1)
    s_r = (shape * residual).sum(-1)
    denominator = noise_var + effect_var * s_s
    log_det = (n - 1) * torch.log(noise_var) + torch.log(denominator)
    quadratic = ((residual * residual).sum(-1) - effect_var * s_r**2 / denominator) / noise_var
    return (-0.5 * (n * math.log(2 * math.pi) + log_det + quadratic)).sum()


@dataclass(frozen=True)
class ExactFit:
    """The exact MLE, its standard errors (inverse observed Fisher information, natural
    scale) and the maximised log-likelihood."""

    estimate: dict[str, float]
    standard_error: dict[str, float]
    log_likelihood: float

    @property
    def minus_two_log_likelihood(self) -> float:
        return -2.0 * self.log_likelihood


def _to_natural(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([xi.exp() if pos else xi for xi, pos in zip(x, _POSITIVE, strict=True)])


def exact_mle(data: NLMEData, start: dict[str, float] | None = None) -> ExactFit:
    """Maximise :func:`marginal_log_likelihood` (BFGS on log-transformed positive parameters,
    started from data-based values or ``start``), then invert the Hessian on the natural scale.
    """
    summary = data.summary
    span = summary.time_max - summary.time_min
    start = start or {
        "asymptote": summary.value_max,
        "inflection": summary.time_min + span / 2,
        "scale": span / 8,
        "asymptote_sd": summary.value_max / 10,
        "noise_sd": summary.value_max / 50,
    }
    x0 = np.array(
        [
            np.log(start[p]) if pos else start[p]
            for p, pos in zip(PARAMETERS, _POSITIVE, strict=True)
        ]
    )

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        loss = -marginal_log_likelihood(_to_natural(xt), data)
        (grad,) = torch.autograd.grad(loss, xt)
        return loss.item(), grad.numpy()

    result = scipy.optimize.minimize(
        objective, x0, jac=True, method="BFGS", options={"gtol": 1e-8, "maxiter": 10_000}
    )
    if not result.success and np.linalg.norm(result.jac) > 1e-4:
        raise RuntimeError(f"exact MLE did not converge: {result.message}")
    natural = _to_natural(torch.tensor(result.x, dtype=torch.float64))
    hessian = torch.autograd.functional.hessian(
        lambda p: -marginal_log_likelihood(p, data), natural
    )
    covariance = torch.linalg.inv(hessian)
    return ExactFit(
        estimate=dict(zip(PARAMETERS, natural.tolist(), strict=True)),
        standard_error=dict(zip(PARAMETERS, covariance.diagonal().sqrt().tolist(), strict=True)),
        log_likelihood=-float(result.fun),
    )
