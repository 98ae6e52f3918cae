"""The log-likelihood ``log p(y | theta)`` by importance sampling, as saemix's ``llis``: for
each variety an independent proposal centred on the conditional mean of its (centred,
unconstrained) individual latents, scaled by their conditional covariance, as a multivariate
Student t (``df`` degrees of freedom: heavier tails than the target keep the weights' variance
finite). The draws are randomised quasi-Monte Carlo (lower error than independent draws in the
few dimensions of one variety's latents) and reproducible chunk by chunk, so that
:mod:`.fisher` reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import scipy.stats
import torch

from pyro_nlme.infer.saem.joint import JointModel, Rows


class LogLikelihood(NamedTuple):
    """:param value: the estimate of ``log p(y | theta)``.
    :param mcse: its Monte-Carlo standard error (delta method on each variety's mean weight).
    :param per_variety: ``[V]`` each variety's estimate.
    :param log_weights: ``[M, V]`` the log importance weights.
    :param n_samples: draws per variety ``M``.
    """

    value: float
    mcse: float
    per_variety: torch.Tensor
    log_weights: torch.Tensor
    n_samples: int

    @property
    def minus_two(self) -> float:
        return -2.0 * self.value


class Chunk(NamedTuple):
    """``m`` draws per variety: ``rows`` (``m`` copies), ``u`` ``[m * V, D]``, ``log_q``
    ``[m * V]``, ``start`` the index of its first draw."""

    rows: Rows
    u: torch.Tensor
    log_q: torch.Tensor
    start: int


class Proposal:
    """Per-variety multivariate Student t proposals.

    :param mean: ``[V, D]`` conditional means of the centred latents ``u``.
    :param covariance: ``[V, D, D]`` their conditional covariances.
    :param df: degrees of freedom.
    """

    def __init__(
        self,
        joint: JointModel,
        mean: torch.Tensor,
        covariance: torch.Tensor,
        df: float = 5.0,
        seed: int = 0,
        rows_per_chunk: int = 20_000,
    ):
        self.joint, self.mean, self.df, self.seed = joint, mean, df, seed
        n, d = mean.shape
        eye = torch.eye(d, dtype=mean.dtype)
        covariance = 0.5 * (covariance + covariance.transpose(-1, -2))
        jitter = 1e-8 * covariance.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
        self.scale_tril = torch.linalg.cholesky(covariance + jitter[:, None, None] * eye)
        self.copies = max(1, rows_per_chunk // max(n, 1))

    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        d = self.mean.shape[-1]
        diff = (u - self.mean).unsqueeze(-1)
        solved = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False).squeeze(-1)
        maha = solved.pow(2).sum(-1)
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return (
            math.lgamma((self.df + d) / 2)
            - math.lgamma(self.df / 2)
            - d / 2 * math.log(self.df * math.pi)
            - log_det
            - (self.df + d) / 2 * torch.log1p(maha / self.df)
        )

    def chunks(self, n_samples: int) -> Iterator[Chunk]:
        """The draws, the same on every call: randomised quasi-Monte Carlo (a scrambled Sobol
        sequence in ``D + 1`` dims, one random rotation per variety), mapped to the t through
        the normal and chi-square quantiles."""
        n, d = self.mean.shape
        points = torch.quasirandom.SobolEngine(d + 1, scramble=True, seed=self.seed).draw(
            n_samples, dtype=self.mean.dtype
        )
        generator = torch.Generator().manual_seed(self.seed)
        shifts = torch.rand(n, d + 1, generator=generator, dtype=self.mean.dtype)
        for start in range(0, n_samples, self.copies):
            block = points[start : start + self.copies]
            m = block.shape[0]
            uniform = ((block[:, None, :] + shifts) % 1.0).clamp(1e-12, 1 - 1e-12)
            normal = torch.special.ndtri(uniform[..., :d])
            chi2 = torch.as_tensor(
                scipy.stats.chi2.ppf(uniform[..., d:].numpy(), self.df), dtype=self.mean.dtype
            )
            step = (self.scale_tril @ normal.unsqueeze(-1)).squeeze(-1)
            u = self.mean + step * (self.df / chi2).sqrt()
            yield Chunk(
                self.joint.rows(m), u.reshape(m * n, d), self.log_density(u).reshape(-1), start
            )


@torch.no_grad()
def importance_sampling(
    joint: JointModel, theta: torch.Tensor, proposal: Proposal, n_samples: int
) -> LogLikelihood:
    """Estimate ``log p(y | theta) = sum_i log mean_m p(y_i, u_im | theta) / q_i(u_im)``."""
    n = joint.n_varieties
    log_weights = []
    for chunk in proposal.chunks(n_samples):
        target = joint.log_density(theta, chunk.u, chunk.rows).total
        log_weights.append((target - chunk.log_q).reshape(-1, n))
    log_w = torch.nan_to_num(torch.cat(log_weights), nan=-torch.inf)
    per_variety = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    w = torch.exp(log_w - log_w.max(0).values)
    relative_var = w.var(0) / (log_w.shape[0] * w.mean(0) ** 2)
    return LogLikelihood(
        float(per_variety.sum()), float(relative_var.sum().sqrt()), per_variety, log_w, n_samples
    )
