"""Censored observations (detection limits) for any continuous observation model with a CDF.

An observation is either observed exactly, or only known to lie in ``[lower, upper]``: below a
limit of quantification (left-censored, ``lower = -inf``), above a saturation limit
(right-censored, ``upper = +inf``), or in an interval. Its log-likelihood is then
``log F(upper)``, ``log S(lower)`` or ``log(F(upper) - F(lower))`` (``F`` the CDF, ``S = 1 - F``),
computed in log space: ``log_ndtr`` for Gaussian models, a continued fraction of the incomplete
beta function for Student-t ones, and ``F(u) - F(l)`` as ``F(u) (1 - F(l) / F(u))`` in the lower
tail, ``S(l) (1 - S(u) / S(l))`` in the upper one.

The data layer reads the censoring columns (``docs/observation_models.md``);
:func:`pyro_nlme.model.convention.observe` wraps a model's distribution in :class:`Censored`
where the data have censored values, so every model function gets censoring for free.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.transforms import ExpTransform

MAX_FRACTION_TERMS = 40
"""Most terms of the incomplete-beta continued fraction (Lentz's method). It converges in
``O(sqrt(max(a, b)))`` terms on the side where it is used; :func:`fraction_terms` takes
``10 + 3 sqrt(max(a, b))``, at most 40, which gives the log-CDF of a Student-t to 1e-10
(relative) for ``noise_df`` from 0.5 to 5,000 (checked against mpmath in the tests)."""


def fraction_terms(a: torch.Tensor, b: torch.Tensor) -> int:
    """Terms of the continued fraction enough for every element (one device sync); the most
    under ``torch.jit.trace`` (e.g. SAEM's traced E-step), whose graph keeps the count of the
    traced call while the parameters move."""
    if torch.jit.is_tracing():
        return MAX_FRACTION_TERMS
    largest = float(torch.maximum(a, b).max().detach()) if a.numel() else 0.0
    return min(MAX_FRACTION_TERMS, int(math.ceil(10 + 3 * math.sqrt(largest))))


_LOG_HALF = math.log(0.5)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` (Maechler 2012); ``x`` is clamped below ``-eps`` so
    that the result and its gradient stay finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _beta_continued_fraction(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes ``betacf``), elementwise."""
    tiny = torch.finfo(x.dtype).tiny

    def guard(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t.abs() < tiny, torch.full_like(t, tiny), t)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, fraction_terms(a, b) + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 / guard(1 + even * d)
        c = guard(1 + even / c)
        h = h * d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 / guard(1 + odd * d)
        c = guard(1 + odd / c)
        h = h * d * c
    return h


def log_betainc(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log I_x(a, b)``, the log of the regularised incomplete beta function, differentiable in
    ``a``, ``b`` and ``x``.

    :param x: in ``[0, 1]``; ``y = 1 - x`` passed separately so that neither loses precision.
    """
    swap = x > (a + 1) / (a + b + 2)
    aa, bb = torch.where(swap, b, a), torch.where(swap, a, b)
    xx, yy = torch.where(swap, y, x), torch.where(swap, x, y)
    log_beta = torch.lgamma(aa) + torch.lgamma(bb) - torch.lgamma(aa + bb)
    front = torch.xlogy(aa, xx) + torch.xlogy(bb, yy) - log_beta - torch.log(aa)
    log_fraction = torch.log(
        _beta_continued_fraction(aa, bb, xx).clamp(min=torch.finfo(x.dtype).tiny)
    )
    log_value = front + log_fraction
    return torch.where(swap, log1mexp(log_value), log_value.clamp(max=0.0))


def student_t_log_cdf(df: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log P(T <= z)`` for ``T`` a standard Student-t with ``df`` degrees of freedom."""
    return student_t_log_cdf_and_survival(df, z)[0]


def student_t_log_cdf_and_survival(
    df: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(T <= z), log P(T > z))`` for ``T`` a standard Student-t with ``df`` degrees
    of freedom, from one tail ``P(T <= -|z|) = I_{df / (df + z^2)}(df / 2, 1 / 2) / 2``."""
    z2 = z * z
    # Below |z| = eps the CDF is 1/2 to the dtype's precision; the series would divide by ~0.
    at_median = z2 < torch.finfo(z.dtype).eps ** 2
    z2 = torch.where(at_median, torch.ones_like(z2), z2)
    x, y = df / (df + z2), z2 / (df + z2)
    log_tail = _LOG_HALF + log_betainc(df / 2, torch.full_like(df, 0.5), x, y)
    log_tail = torch.where(at_median, torch.full_like(log_tail, _LOG_HALF), log_tail)
    log_body = log1mexp(log_tail)
    return torch.where(z < 0, log_tail, log_body), torch.where(z < 0, log_body, log_tail)


def _log_cdf_and_survival(
    distribution: dist.Distribution, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log F(value), log S(value))`` elementwise, stably for the Gaussian and Student-t
    families (also on the log scale); through ``cdf`` otherwise.

    :raises ValueError: if the distribution has no CDF.
    """
    if isinstance(distribution, torch.distributions.TransformedDistribution) and _is_exp(
        distribution
    ):
        return _log_cdf_and_survival(distribution.base_dist, torch.log(value.clamp(min=0.0)))
    if isinstance(distribution, torch.distributions.Normal):
        z = (value - distribution.loc) / distribution.scale
        return torch.special.log_ndtr(z), torch.special.log_ndtr(-z)
    if isinstance(distribution, torch.distributions.StudentT):
        z = (value - distribution.loc) / distribution.scale
        return student_t_log_cdf_and_survival(distribution.df, z)
    try:
        cdf = distribution.cdf(value)
    except NotImplementedError:
        raise ValueError(
            f"the data have censored values, but {type(distribution).__name__} has no CDF: "
            "choose a continuous observation model with one (docs/observation_models.md)"
        ) from None
    return torch.log(cdf), torch.log1p(-cdf)


def _is_exp(distribution: dist.Distribution) -> bool:
    """Whether ``distribution`` is ``exp`` of another (log-normal, log-Student-t)."""
    if not isinstance(distribution, torch.distributions.TransformedDistribution):
        return False
    transforms = distribution.transforms
    return len(transforms) == 1 and isinstance(transforms[0], ExpTransform)


def _take(distribution: dist.Distribution, cells: torch.Tensor) -> dist.Distribution | None:
    """The distribution restricted to the cells of a boolean mask of its batch shape (a flat
    batch), or None for a family this module does not know how to restrict."""
    if isinstance(distribution, torch.distributions.TransformedDistribution) and _is_exp(
        distribution
    ):
        base = _take(distribution.base_dist, cells)
        return None if base is None else dist.TransformedDistribution(base, ExpTransform())
    if isinstance(distribution, torch.distributions.Normal):
        return dist.Normal(distribution.loc[cells], distribution.scale[cells])
    if isinstance(distribution, torch.distributions.StudentT):
        return dist.StudentT(
            distribution.df[cells], distribution.loc[cells], distribution.scale[cells]
        )
    return None


def censored_log_prob(
    distribution: dist.Distribution, lower: torch.Tensor, upper: torch.Tensor
) -> torch.Tensor:
    """``log P(lower <= y <= upper)`` elementwise: ``log F(upper)`` where ``lower = -inf``,
    ``log S(lower)`` where ``upper = +inf``, ``log(F(upper) - F(lower))`` otherwise.

    :param distribution: a continuous distribution (batch shape of the bounds).
    :param lower: lower bounds, ``-inf`` where open.
    :param upper: upper bounds, ``+inf`` where open; ``lower < upper``.
    """
    has_lower, has_upper = torch.isfinite(lower), torch.isfinite(upper)
    lower_at = torch.where(has_lower, lower, upper)
    upper_at = torch.where(has_upper, upper, lower)
    both = distribution.expand((2,) + distribution.batch_shape)
    log_cdf, log_sf = _log_cdf_and_survival(both, torch.stack([upper_at, lower_at]))
    (log_cdf_upper, log_cdf_lower), (log_sf_upper, log_sf_lower) = log_cdf, log_sf
    in_lower_tail = log_cdf_upper + log1mexp(log_cdf_lower - log_cdf_upper)
    in_upper_tail = log_sf_lower + log1mexp(log_sf_upper - log_sf_lower)
    interval = torch.where(log_cdf_lower > _LOG_HALF, in_upper_tail, in_lower_tail)
    return torch.where(
        has_lower & has_upper, interval, torch.where(has_upper, log_cdf_upper, log_sf_lower)
    )


class Censored(TorchDistribution):
    """A continuous distribution of which some observations are censored to an interval.

    ``log_prob(value)`` is the base density at exactly observed cells (``censoring == 0``) and
    :func:`censored_log_prob` at censored ones, whatever ``value`` holds there (the data's
    recorded bound).

    ``sample()`` draws what the same detection limits would record: a draw ``y`` of the base
    distribution, replaced at a censored cell by the recorded bound (``upper`` where
    ``censoring == 1``, ``lower`` where ``-1``) when ``y`` falls in ``[lower, upper]``. Posterior
    predictive values of censored cells thus compare directly with the data: a point mass at the
    limit, plus the draws that left the censored interval.

    :param base: the observation model's distribution, batch shape ``[..., V, S, P, T]``.
    :param censoring: int8 codes, ``1`` left- (or interval-) censored with the recorded value
        the upper bound, ``-1`` right-censored with the recorded value the lower bound, ``0``
        observed.
    :param lower: lower bounds (``-inf`` where open or observed).
    :param upper: upper bounds (``+inf`` where open or observed).
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        base: dist.Distribution,
        censoring: torch.Tensor,
        lower: torch.Tensor,
        upper: torch.Tensor,
        validate_args=None,
    ):
        shape = torch.broadcast_shapes(base.batch_shape, censoring.shape)
        self.base = base.expand(shape) if base.batch_shape != shape else base
        self.censoring = censoring.expand(shape)
        if base.support is constraints.positive:  # a lower bound <= 0 does not bound it
            lower = torch.where(lower > 0, lower, torch.full_like(lower, -math.inf))
        self.lower, self.upper = lower.expand(shape), upper.expand(shape)
        super().__init__(shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Censored(
            self.base.expand(batch_shape),
            self.censoring.expand(batch_shape),
            self.lower.expand(batch_shape),
            self.upper.expand(batch_shape),
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        censored = self.censoring != 0
        log_prob = self.base.log_prob(value)
        cells = censored.expand(log_prob.shape)
        if not cells.any():
            return log_prob
        taken = _take(self.base, cells)
        if taken is None:
            terms = censored_log_prob(self.base, self.lower, self.upper)[cells]
        else:
            terms = censored_log_prob(taken, self.lower[cells], self.upper[cells])
        return log_prob.masked_scatter(cells, terms)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        draw = self.base.sample(sample_shape)
        recorded = torch.where(self.censoring > 0, self.upper, self.lower).to(draw)
        inside = (self.censoring != 0) & (draw >= self.lower) & (draw <= self.upper)
        return torch.where(inside, recorded, draw)
