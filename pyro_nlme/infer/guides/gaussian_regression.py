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

**Global scale integrated out.** When every prior variance is proportional to the square of
one scale per curve parameter, ``D_k(s) = (s_k / s0_k) ** 2 D_k`` (the ridge's genetic SD;
the horseshoe's global scale, the slab aside), the effects integrate out in closed form:
with ``S_k = unit_k^2 W_k^1/2 Z D_k Z' W_k^1/2 = Q diag(e) Q'``,
``W_k^1/2 y_k ~ N(0, I + a S_k)``, ``a = (s_k / s0_k) ** 2``, so

    log p(y_k | s_k) = -1/2 sum_i [log(1 + a e_i) + r_i^2 / (1 + a e_i)] + const,
    r = Q' W_k^1/2 y_k

(:meth:`GaussianRegressionPosterior.log_scale_posterior`). Updating ``s`` from this
marginal likelihood, rather than from ``E_q[log p(b | s)]`` with ``q(b)`` built at the
current ``s`` (EM), matters when ``M >> V``: ``b`` then pins ``s`` with a curvature of about
``2 M`` in ``log s`` against ``O(V)`` from the data, and each EM step moves ``s`` by a
fraction ``V / M`` of the way (docs/marker_priors.md).

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
from torch.distributions import Distribution

from pyro_nlme.data import GenotypeMatrix

_NO_SHAPE = torch.Size()


class GaussianRegressionPosterior(TorchDistribution):
    """The posterior of ``b [M, K]`` (module docstring), one event of shape ``[M, K]``.

    :param markers: the genotypes of the regression's ``V`` varieties.
    :param response: ``[V, K]`` the response ``y``.
    :param weight: ``[V, K]`` its precisions ``w``.
    :param unit: ``[K]`` the response's change per unit of ``Z @ b``.
    :param prior_variance: ``[M, K]`` the prior variances ``d``.
    :param gram: ``[K, V, V]`` ``Z diag(d[:, k]) Z'`` in float64 if already known (one pass
        over the dosages otherwise).
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
        gram: torch.Tensor | None = None,
        validate_args=None,
    ):
        self.markers, self.prior_variance = markers, prior_variance
        self.response, self.weight, self.unit = (
            x.to(torch.float64) for x in (response, weight, unit)
        )
        self.root_weight = self.weight.sqrt()
        if gram is None:
            gram = markers.standardized_gram(prior_variance.to(torch.float64))
        self.gram = gram  # [K, V, V]
        root = self.root_weight.T  # [K, V]
        self.system = (self.unit[:, None, None] ** 2) * root[:, :, None] * gram * root[:, None, :]
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        self.cholesky = torch.linalg.cholesky(self.system + identity)
        self.loc = self._pull_back(self.root_weight * self.response)
        super().__init__(
            batch_shape=torch.Size(), event_shape=prior_variance.shape, validate_args=validate_args
        )

    def rescaled(self, factor: torch.Tensor) -> GaussianRegressionPosterior:
        """The posterior with every prior variance of curve parameter ``k`` multiplied by
        ``factor[k]`` (``[K]``, > 0), from the stored Gram matrices (no pass over the
        dosages)."""
        factor = factor.to(torch.float64)
        return GaussianRegressionPosterior(
            self.markers,
            self.response,
            self.weight,
            self.unit,
            self.prior_variance * factor.to(self.prior_variance.dtype),
            gram=self.gram * factor[:, None, None],
        )

    def log_scale_posterior(
        self,
        prior: Distribution,
        reference: torch.Tensor,
        half_width: float = 12.0,
        resolution: float = 0.005,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Laplace approximation of the posterior of ``log s`` given the response, the effects
        integrated out, for prior variances ``(s / reference) ** 2 * d`` (module docstring).

        The log posterior (with the Jacobian of ``log``) is evaluated on a grid of
        ``log s`` within ``half_width`` of ``log reference`` (step ``resolution``); its mode is
        refined by a parabola through the best grid point and its neighbours, and the SD is
        ``1 / sqrt(-curvature)`` there.

        :param prior: the scale's prior, batch shape ``[K]`` (``log_prob`` of positive values).
        :param reference: ``[K]`` the scale at which ``d`` is the prior variance.
        :returns: ``(mode, sd)`` of ``log s``, ``[K]`` each.
        :raises ValueError: if a mode lies on the grid's edge.
        """
        reference = reference.to(torch.float64)
        eigenvalues, vectors = torch.linalg.eigh(self.system)  # [K, V], [K, V, V]
        eigenvalues = eigenvalues.clamp(min=0)
        projected = vectors.transpose(-1, -2) @ (self.root_weight * self.response).T[..., None]
        squares = projected[..., 0] ** 2  # [K, V]
        shift = torch.arange(-half_width, half_width + resolution / 2, resolution)
        shift = shift.to(reference)

        def log_posterior(shift: torch.Tensor) -> torch.Tensor:  # [G] or [G, K] -> [G, K]
            shift = shift if shift.dim() == 2 else shift[:, None].expand(-1, len(reference))
            spread = 1 + torch.exp(2 * shift)[..., None] * eigenvalues  # [G, K, V]
            likelihood = -0.5 * (spread.log() + squares / spread).sum(-1)
            log_scale = reference.log() + shift
            return likelihood + prior.log_prob(log_scale.exp()).to(shift) + log_scale

        values = log_posterior(shift)
        best = values.argmax(0)  # [K]
        if ((best == 0) | (best == len(shift) - 1)).any():
            raise ValueError(
                "the posterior mode of the log scale is on the edge of the grid "
                f"(+-{half_width} around {reference.log().tolist()})"
            )
        columns = torch.arange(len(reference))
        left, middle, right = (values[best + step, columns] for step in (-1, 0, 1))
        mode = shift[best] + resolution * (left - right) / (2 * (left - 2 * middle + right))
        at_mode = torch.stack([mode - resolution, mode, mode + resolution])
        around = log_posterior(at_mode)
        curvature = (around[0] - 2 * around[1] + around[2]) / resolution**2
        return reference.log() + mode, (-curvature).rsqrt()

    @property
    def variance(self) -> torch.Tensor:
        """``diag Sigma_k``, ``[M, K]`` in the effects' dtype: by Woodbury,
        ``d - d ** 2 S`` (:meth:`_marker_projections`, one pass over the dosages; in float64:
        for an effect the data determine, the two terms nearly cancel)."""
        variance = self.prior_variance.to(torch.float64).clone()
        for columns, explained, _ in self._marker_projections():
            variance[columns] -= variance[columns] ** 2 * explained
        return variance.to(self.prior_variance.dtype)

    def marker_evidence(self, chunk_markers: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """What the response says of each effect alone, every other effect integrated out at
        its prior variance: as a function of the effect's own prior variance ``v``, the
        marginal likelihood is

            log p(y_k | v) = -1/2 log(1 + s v) + q ** 2 v / (2 (1 + s v)) + const

        (:func:`single_effect_log_evidence`), that of an estimate ``q / s`` of the effect with
        variance ``1 / s`` (Tipping & Faul's 2003 sparsity and quality factors). From
        :meth:`_marker_projections`, ``s = S / (1 - d S)`` and ``q = Q / (1 - d S)`` remove the
        effect's own prior variance ``d`` from ``C``; ``1 - d S = Sigma_mm / d > 0``.

        :returns: ``(s, q)``, ``[M, K]`` float64 each.
        """
        variance = self.prior_variance.to(torch.float64)
        precision, score = torch.empty_like(variance), torch.empty_like(variance)
        for columns, explained, projected in self._marker_projections(chunk_markers):
            remaining = 1 - variance[columns] * explained
            precision[columns] = explained / remaining
            score[columns] = projected / remaining
        return precision, score

    def _marker_projections(self, chunk_markers: int = 4096):
        """Per chunk of at most ``chunk_markers`` markers, ``(columns, S, Q)`` with ``S, Q``
        ``[C, K]`` float64: ``S[m, k] = x' C_k^-1 x`` and ``Q[m, k] = x' C_k^-1 y_k`` for
        ``x = unit_k z_m``, the marker's standardised dosages, where ``C_k^-1 = W_k^1/2 B_k^-1
        W_k^1/2`` is the precision of ``y_k`` with every effect integrated out (one pass over
        the dosages)."""
        inverse = torch.cholesky_inverse(self.cholesky)  # [K, V, V]
        scaled = (self.unit * self.root_weight).T[:, :, None]  # [K, V, 1]
        target = (self.root_weight * self.response).T[..., None]  # [K, V, 1]
        target = torch.cholesky_solve(target, self.cholesky)
        for columns in self.markers.column_chunks(chunk_markers):
            z = scaled * self.markers.standardized_columns(columns, torch.float64)  # [K, V, C]
            yield columns, ((inverse @ z) * z).sum(1).T, (target * z).sum(1).T

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


def single_effect_log_evidence(
    precision: torch.Tensor, score: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """``log p(y | v) = -1/2 log(1 + s v) + q ** 2 v / (2 (1 + s v))``, up to a constant in
    ``v``, elementwise: the marginal likelihood of one effect's prior variance ``v``
    (:meth:`GaussianRegressionPosterior.marker_evidence` gives ``s, q``). ``0`` at ``v = 0``;
    for ``s = q = 0`` (a marker the response does not see) flat."""
    spread = 1 + precision * variance
    return -0.5 * spread.log() + score**2 * variance / (2 * spread)
