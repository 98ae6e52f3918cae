"""The exact posterior of marker effects in a Gaussian regression, jointly over all markers.

For each curve parameter ``k``, with standardised dosages ``Z [V, M]``,

    y[:, k] ~ Normal(unit[k] * Z @ b[:, k], 1 / sqrt(w[:, k])),   b[m, k] ~ Normal(0, sqrt(d[m, k]))

has the Gaussian posterior ``N(loc_k, Sigma_k)``, ``Sigma_k^-1 = diag(1 / d_k) + unit_k^2 Z' W_k
Z``. With ``M`` in the tens of thousands and ``V`` in the hundreds, everything goes through the
``V x V`` matrix ``B_k = I + unit_k^2 W_k^1/2 Z D_k Z' W_k^1/2`` (Woodbury; ``B`` rather than
``W^-1 + ...`` keeps varieties of weight 0 allowed and the eigenvalues at least 1):

    loc_k      = unit_k D_k Z' W_k^1/2 B_k^-1 W_k^1/2 y_k
    draw       = b0 + unit_k D_k Z' W_k^1/2 B_k^-1 (W_k^1/2 (y_k - unit_k Z b0) - e),
                 b0 ~ N(0, D_k), e ~ N(0, I)                               (Matheron's rule)
    log det Sigma_k^-1 = -sum log d_k + log det B_k                        (Sylvester)
    (b - loc)' Sigma_k^-1 (b - loc) = sum (b - loc)^2 / d_k + sum w_k (unit_k Z (b - loc))^2

With every weight 0 it is the prior.

A mean-field factor (one independent Normal per marker) of this posterior leaks: its draws of
``Z @ b`` have variance ``sum_m Z[:, m]^2 var_m``, the sum of 60,000 marginal variances, where the
joint posterior's is at most the residual variance ``1 / w``. Under the regularised horseshoe
that variance fed the response's SD, which widened the prior variances in turn, and the fit
blew up (docs/marker_priors.md). The joint posterior has no such leak.

The ``V x V`` algebra is in float64 (``A`` spans the noise variance to ``M`` slab variances);
products with ``Z`` are in the effects' dtype.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints

from pyro_nlme.data import GenotypeMatrix

_NO_SHAPE = torch.Size()


class GaussianRegressionPosterior(TorchDistribution):
    """The posterior of ``b [M, K]`` (module docstring), one event of shape ``[M, K]``.

    :param markers: the genotypes of the regression's ``V`` varieties.
    :param response: ``[V, K]`` the response ``y``.
    :param weight: ``[V, K]`` its precisions ``w``.
    :param unit: ``[K]`` the response's change per unit of ``Z @ b``.
    :param prior_variance: ``[M, K]`` the prior variances ``d``.
    """

    arg_constraints = {}
    has_rsample = True
    support = constraints.independent(constraints.real, 2)

    def __init__(
        self,
        markers: GenotypeMatrix,
        response: torch.Tensor,
        weight: torch.Tensor,
        unit: torch.Tensor,
        prior_variance: torch.Tensor,
        validate_args=None,
    ):
        self.markers, self.prior_variance = markers, prior_variance
        self.response, self.weight, self.unit = (
            x.to(torch.float64) for x in (response, weight, unit)
        )
        self.root_weight = self.weight.sqrt()
        gram = markers.standardized_gram(prior_variance.to(torch.float64))  # [K, V, V]
        root = self.root_weight.T  # [K, V]
        system = (self.unit[:, None, None] ** 2) * root[:, :, None] * gram * root[:, None, :]
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        self.cholesky = torch.linalg.cholesky(system + identity)
        self.loc = self._pull_back(self.root_weight * self.response)
        super().__init__(
            batch_shape=torch.Size(), event_shape=prior_variance.shape, validate_args=validate_args
        )

    def _pull_back(self, rhs: torch.Tensor) -> torch.Tensor:
        """``unit_k D_k Z' W_k^1/2 B_k^-1 rhs[:, k]``: ``[V, K]`` (float64) -> ``[M, K]`` in the
        effects' dtype."""
        solved = torch.cholesky_solve(rhs.T[..., None], self.cholesky)[..., 0].T
        solved = (self.unit * self.root_weight * solved).to(self.prior_variance.dtype)
        return self.prior_variance * self.markers.standardized_rmatmul(solved)

    def _fitted(self, effects: torch.Tensor) -> torch.Tensor:
        """``unit_k Z @ effects[:, k]`` ``[V, K]`` (float64)."""
        return self.unit * self.markers.standardized_matmul(effects).to(torch.float64)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        """Exact draws by Matheron's rule: a prior draw corrected by the regression of its
        residual (module docstring); ``[*sample_shape, M, K]``. No parameter of the
        distribution is learnt by gradient (its state is set by coordinate ascent), so a draw
        carries no gradient: ``rsample`` only tells Pyro not to add a score-function term."""
        draws = []
        for _ in range(math.prod(sample_shape)):
            prior = self.prior_variance.sqrt() * torch.randn_like(self.prior_variance)
            residual = self.root_weight * (self.response - self._fitted(prior))
            draws.append(prior + self._pull_back(residual - torch.randn_like(residual)))
        return torch.stack(draws).reshape(*sample_shape, *self.event_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log N(value; loc, Sigma)`` summed over the ``[M, K]`` event, by the precision form
        and Sylvester's determinant (module docstring); ``value [*batch, M, K]``."""
        batch = value.shape[:-2]
        flat = (value - self.loc).reshape(-1, *self.event_shape)
        quadratic = []
        for residual in flat:
            fitted = self._fitted(residual)
            quadratic.append(
                (residual.to(torch.float64) ** 2 / self.prior_variance.to(torch.float64)).sum()
                + (self.weight * fitted**2).sum()
            )
        log_det_precision = (
            -self.prior_variance.to(torch.float64).log().sum()
            + 2 * self.cholesky.diagonal(dim1=-2, dim2=-1).log().sum()
        )
        size = self.prior_variance.numel()
        log_density = 0.5 * (
            log_det_precision - torch.stack(quadratic) - size * math.log(2 * math.pi)
        )
        return log_density.reshape(batch).to(value.dtype)
