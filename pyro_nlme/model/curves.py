"""Growth curves: plain torch functions ``f(time, **parameters) -> trait``, broadcasting over
plates. Every parameter is on its natural (constrained) scale; models map unconstrained latents
to it. Written in stable forms (``sigmoid``, ``softplus``): ``A / (1 + exp(-x))`` gives NaN
gradients where ``exp`` overflows.

Any user function with the same form (first argument ``time``, then named parameters) works
everywhere a curve is expected; :func:`curve_parameter_names` reads the names off its signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

Curve = Callable[..., torch.Tensor]


def logistic(
    time: torch.Tensor, asymptote: torch.Tensor, rate: torch.Tensor, inflection: torch.Tensor
) -> torch.Tensor:
    """``asymptote / (1 + exp(-rate * (time - inflection)))``.

    :param asymptote: upper plateau, in trait units (> 0).
    :param rate: relative growth rate at the inflection, 1 / time unit (> 0); nlme's ``scal`` is
        ``1 / rate``.
    :param inflection: time of the inflection point (half the asymptote), time units.
    """
    return asymptote * torch.sigmoid(rate * (time - inflection))


def log_logistic(
    time: torch.Tensor, log_asymptote: torch.Tensor, rate: torch.Tensor, inflection: torch.Tensor
) -> torch.Tensor:
    """``log(logistic(time, exp(log_asymptote), rate, inflection))`` without underflow:
    ``log_asymptote + logsigmoid(rate * (time - inflection))`` (for multiplicative errors)."""
    return log_asymptote + torch.nn.functional.logsigmoid(rate * (time - inflection))


def gompertz(
    time: torch.Tensor, asymptote: torch.Tensor, rate: torch.Tensor, inflection: torch.Tensor
) -> torch.Tensor:
    """``asymptote * exp(-exp(-rate * (time - inflection)))``; the inflection is at
    ``asymptote / e``. The inner exponent is capped at 50 (``exp(-exp(50))`` is 0 in float64
    too), so that the gradient far before the inflection is 0, not ``0 * inf``."""
    exponent = (-rate * (time - inflection)).clamp(max=50.0)
    return asymptote * torch.exp(-torch.exp(exponent))


def richards(
    time: torch.Tensor,
    asymptote: torch.Tensor,
    rate: torch.Tensor,
    inflection: torch.Tensor,
    shape: torch.Tensor,
) -> torch.Tensor:
    """Generalised logistic ``asymptote * (1 + shape * exp(-rate * (time - inflection)))
    ** (-1 / shape)``, evaluated as ``exp(-softplus(log(shape) - rate * (time - inflection))
    / shape)``. ``shape = 1`` is the logistic; ``shape -> 0`` tends to the Gompertz.

    :param shape: asymmetry (> 0), dimensionless.
    """
    log_term = F.softplus(torch.log(shape) - rate * (time - inflection))
    return asymptote * torch.exp(-log_term / shape)


def monomolecular(
    time: torch.Tensor, asymptote: torch.Tensor, rate: torch.Tensor, onset: torch.Tensor
) -> torch.Tensor:
    """``asymptote * (1 - exp(-rate * (time - onset)))``: no inflection, zero at ``onset``."""
    return asymptote * -torch.expm1(-rate * (time - onset))


def exponential(time: torch.Tensor, initial: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """``initial * exp(rate * time)``: unlimited growth from ``initial`` at time 0."""
    return initial * torch.exp(rate * time)


CURVES: dict[str, Curve] = {
    "logistic": logistic,
    "gompertz": gompertz,
    "richards": richards,
    "monomolecular": monomolecular,
    "exponential": exponential,
}


def curve_parameter_names(curve: Curve) -> tuple[str, ...]:
    """Names of a curve's parameters: its positional parameters after ``time``."""
    names = list(inspect.signature(curve).parameters)
    if not names or names[0] != "time":
        raise TypeError(f"a curve's first argument must be 'time', got {names[:1]}")
    return tuple(names[1:])
