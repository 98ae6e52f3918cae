"""Gaussian marker effects in SAEM: the n << p kernel form of the ridge M-step.

A model with markers in the effects form (``models/g2was.py``, :func:`pyro_nlme.model.priors.
marker_effects`) has a population site ``beta`` ``[M, K]``, ``beta[:, k] ~ Normal(0, sd_k ** 2 /
M I_M)``, that enters the rest of the model only through the genetic values ``g = Z beta``
``[V, K]`` (``Z`` the standardised dosages), each of which shifts a set ``E_k`` of Gaussian
individual effects (g2was: ``variety_scenario_effect[v, s, k]`` for every scenario ``s``).
``beta`` is a random effect of dimension ``M`` shared by all varieties: maximum likelihood
integrates it out. Everything the data see depends on ``beta`` through ``g``, whose prior is
``Normal(0, sd_k ** 2 K)`` with ``K = Z Z^T / M`` (:mod:`pyro_nlme.model.kinship`), so the
engine works with ``g`` and never with a ``p x p`` system:

- **E-step (Gibbs).** The centred latents ``u`` include ``g``: ``u[v, e] = effect[v, e] +
  location + g[v, k]`` for ``e`` in ``E_k``. Given ``u`` (the per-variety MCMC kernels), ``g``
  has an exact Gaussian conditional: with ``K = U diag(lambda) U^T`` (the ``r`` non-zero
  eigenvalues) and ``g = U a``, ``a ~ Normal(0, sd_k ** 2 diag(lambda))`` a priori and the
  precision-weighted mean ``rbar_v`` of the effects in ``E_k`` observes ``g_v`` with precision
  ``P_v``, so ``a | u ~ Normal(Q^{-1} U^T P rbar, Q^{-1})``, ``Q = diag(1 / (sd_k ** 2 lambda))
  + U^T diag(P) U`` (``r x r``, ``r < V``). Each chain draws its own ``g``; given ``g`` the
  varieties are independent again, and the kernels target ``p(u_i | y_i, g_i, theta)``
  through :attr:`JointModel.offset`.
- **M-step.** ``sd_k ** 2 = E[a^T diag(1 / lambda) a] / r`` from its stochastic
  approximation, the moments given ``u`` taken exactly (Rao-Blackwellised); the other
  parameters take their usual closed form with ``u - g`` in place of ``u``.
- **Marker effects.** At the end, ``beta_hat = Z^T K^+ g_hat / M`` with ``g_hat`` the stochastic
  approximation of ``E[g | y]``: the BLUP of the marker effects at the estimate (the ridge
  solution in its kernel form; :func:`pyro_nlme.model.kinship.blup_marker_effects`).

While the engine runs, the model is evaluated with ``beta = 0`` on genotypes whose
``standardized_matmul`` returns zeros (:class:`PinnedGenotypes`), so that a density evaluation
costs nothing per marker; the genetic values come in through the offset.

**Standard errors of the genetic SDs.** The log-likelihood and Louis' information after the fit
are conditional on the genetic values at ``E[g | y]`` (:mod:`.output`), where the genetic SDs
are flat directions. Their SEs come from the *genetic block* instead: the genetic SDs, the SDs
of the shifted effects and the location parameters of those effects. In ``log p(y, u; theta)``
with ``g`` integrated out, these parameters enter only through the shifted effects' marginal
density ``log p(x; theta)``, ``x = effects + g`` (:func:`marginal_log_density`), which is
Gaussian and exact. Louis' identity with ``u`` as the missing data then gives the block's
observed information with the other parameters held at their estimates:
``E[-d2 log p(x)] - Cov[d log p(x)]`` over ``p(u | y)``. Its draws are the chains' latents over
``genetic_sweeps`` further E-step and Gibbs sweeps at the estimate
(:func:`genetic_information`). The draws are correlated, so the information carries a
Monte-Carlo error; it is estimated by leaving one chain out at a time (jackknife over the
independent chains).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pyro.distributions import MultivariateNormal, Normal

from pyro_nlme.data import GenotypeMatrix
from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.util import is_real_support
from pyro_nlme.model.kinship import RANK_TOLERANCE, blup_marker_effects, genomic_relationship


class PinnedGenotypes(GenotypeMatrix):
    """Genotypes whose marker effects are pinned at 0 while the engine runs: the product with
    the (zero) effects is returned without reading the dosages. Any non-zero effect is an
    error."""

    def standardized_matmul(self, weights: torch.Tensor, rows: torch.Tensor | None = None):
        if bool(weights.detach().ne(0).any()):
            raise RuntimeError(
                "marker effects must stay 0 while SAEM runs the kernel form (pyro_nlme.infer.saem"
                ".field); this is a bug of the engine"
            )
        n_rows = self.n_varieties if rows is None else len(rows)
        return weights.new_zeros(n_rows, weights.shape[-1])


def pinned(markers: GenotypeMatrix) -> PinnedGenotypes:
    return PinnedGenotypes(
        **{f.name: getattr(markers, f.name) for f in dataclasses.fields(GenotypeMatrix)}
    )


@dataclass(frozen=True)
class MarkerField:
    """A detected marker-effect site and what its genetic values shift.

    :param site: the population site ``[M, K]``.
    :param sd_index: ``[K]`` the ``theta`` element of each column's SD.
    :param z_index: ``[K, S]`` the latent components shifted by ``g[:, k]`` (coefficient 1).
    :param effect_site: the individual site those components belong to.
    :param markers: the genotypes (real dosages).
    :param eigenvectors: ``[V, r]`` of ``K`` (non-zero eigenvalues only).
    :param eigenvalues: ``[r]``.
    """

    site: str
    sd_index: torch.Tensor
    z_index: torch.Tensor
    effect_site: str
    markers: GenotypeMatrix
    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())


def kernel(markers: GenotypeMatrix, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors ``[V, r]`` and non-zero eigenvalues ``[r]`` of ``K = Z Z^T / M``
    (eigenvalues below :data:`~pyro_nlme.model.kinship.RANK_TOLERANCE` of the largest are 0)."""
    values, vectors = torch.linalg.eigh(genomic_relationship(markers, dtype=dtype))
    keep = values > RANK_TOLERANCE * values.abs().max()
    return vectors[:, keep], values[keep]


def detect(joint, probes, zs, rows, diagonal, elements, unwrap) -> MarkerField | None:
    """The marker-effect site of the model, if there is one (module docs).

    Checked on the trace: a real population site ``[M, K]`` (``M`` the data's markers) with a
    zero-mean ``Normal`` prior whose scale is ``sd / sqrt(M)`` for ``K`` positive population
    elements; and exactly, at a random point, that moving ``beta[:, k]`` by ``delta`` changes
    the rest of the model (all but the Gaussian individual terms) as shifting the components of
    one Gaussian individual site that belong to ``k`` (last axis) by ``Z delta``.
    """
    markers = joint.data.markers
    if markers is None:
        return None
    n_markers = markers.n_markers
    traces = [joint.trace(p, z, rows) for p, z in zip(probes[:2], zs[:2], strict=True)]
    for b in joint.population:
        if len(b.shape) != 2 or b.shape[0] != n_markers or not is_real_support(b.support):
            continue
        bases = [unwrap(t.nodes[b.name]["fn"])[0] for t in traces]
        if not all(isinstance(f, Normal) and not f.loc.any() for f in bases):
            continue
        k_columns = b.shape[1]
        sd_index = []
        for k in range(k_columns):
            columns = [
                f.scale.expand(b.shape)[:, k] * n_markers**0.5 for f in bases
            ]  # each entry should equal sd_k
            q = _copied(columns, elements)
            if q is None:
                break
            sd_index.append(q)
        else:
            z_index, effect_site = _shifted_components(joint, probes[2], zs[2], rows, b, diagonal)
            if z_index is None:
                continue
            vectors, values = kernel(markers, joint.dtype)
            return MarkerField(
                b.name, torch.tensor(sd_index), z_index, effect_site, markers, vectors, values
            )
    return None


def _copied(columns, elements) -> int | None:
    for q in elements[0]:
        if all(
            torch.allclose(col, torch.full_like(col, float(el[q])), rtol=1e-8, atol=0.0)
            for col, el in zip(columns, elements, strict=True)
        ):
            return q
    return None


@torch.no_grad()
def _shifted_components(joint, theta, z, rows, block, diagonal):
    """``[K, S]`` components of one diagonal Gaussian site shifted by ``g[:, k]``, or None."""
    markers = joint.data.markers
    gaussian_sites = {g.site for g in diagonal}
    generator = torch.Generator().manual_seed(2)
    k_columns = block.shape[1]

    def rest(t, x):
        density = joint.log_density(t, x, rows)
        gaussian = sum((density.sites[s] for s in gaussian_sites), torch.zeros_like(density.obs))
        return density.total - gaussian

    base = rest(theta, z)
    for g in diagonal:
        site_block = next(b for b in joint.individual if b.name == g.site)
        if site_block.unconstrained_shape[-1:] != (k_columns,):
            continue
        flat = torch.arange(site_block.size).reshape(site_block.unconstrained_shape)
        flat = flat.reshape(-1, k_columns).T + site_block.offset  # [K, S]
        ok = True
        for k in range(k_columns):
            delta = torch.zeros(block.shape, dtype=theta.dtype)
            delta[:, k] = 0.3 * torch.randn(block.shape[0], generator=generator, dtype=theta.dtype)
            shift = markers.standardized_matmul(delta.to(torch.float64))[:, k].to(theta.dtype)
            moved = theta.clone()
            moved[block.indices] += delta.reshape(-1)
            moved_z = z.clone()
            moved_z[:, flat[k]] += shift[rows.variety][:, None]
            unshifted, shifted = rest(moved, z), rest(theta, moved_z)
            change = (unshifted - base).abs()
            if not change.max() > 0 or not torch.all(
                (shifted - unshifted).abs() <= 1e-7 * (1 + change + base.abs())
            ):
                ok = False
                break
        if ok:
            return flat, g.site
    return None, None


class GeneticPosterior(NamedTuple):
    """``a | u ~ Normal(mean, Q^{-1})`` with ``g = U a`` (module docs).

    :param mean: ``[r, C]`` one column per chain.
    :param precision_cholesky: ``[r, r]`` lower Cholesky factor of ``Q``.
    :param variance: ``[r]`` the diagonal of ``Q^{-1}``.
    """

    mean: torch.Tensor
    precision_cholesky: torch.Tensor
    variance: torch.Tensor


def genetic_posterior(
    eigenvectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    sd: torch.Tensor,
    precision: torch.Tensor,
    observed: torch.Tensor,
) -> GeneticPosterior:
    """The conditional of the genetic values given noisy observations of them, in the kernel
    form: only ``r x r`` systems (``r < V``), never ``M x M``.

    :param eigenvectors: ``[V, r]`` and ``eigenvalues`` ``[r]``: ``K``'s non-zero part.
    :param sd: the genetic SD (prior ``g ~ Normal(0, sd ** 2 K)``).
    :param precision: ``[V]`` ``P_v``, the precision with which variety ``v`` observes ``g_v``.
    :param observed: ``[C, V]`` ``P_v rbar_v`` per chain.
    """
    q = torch.diag(1 / (sd**2 * eigenvalues)) + eigenvectors.T @ (precision[:, None] * eigenvectors)
    chol = torch.linalg.cholesky(q)
    mean = torch.cholesky_solve(eigenvectors.T @ observed.T, chol)
    return GeneticPosterior(mean, chol, torch.cholesky_inverse(chol).diagonal())


class GibbsDraw(NamedTuple):
    """One draw of the genetic values given the latents, with its exact conditional moments.

    :param values: ``[C, V, K]`` a draw per chain.
    :param mean: ``[C, V, K]`` ``E[g | u]``.
    :param quadratic: ``[K]`` ``E[a^T diag(1 / lambda) a | u]`` averaged over chains.
    """

    values: torch.Tensor
    mean: torch.Tensor
    quadratic: torch.Tensor


def effect_precisions(field: MarkerField, plan, joint, theta: torch.Tensor) -> torch.Tensor:
    """``[V, K, S]`` prior precisions of the shifted effects (masked entries 0)."""
    from pyro_nlme.infer.saem.mstep import _positive_elements

    natural = _positive_elements(joint, theta)
    diagonal = next(g for g in plan.diagonal if g.site == field.effect_site)
    position = {int(e): i for i, e in enumerate(diagonal.z_index.tolist())}
    columns = torch.tensor([[position[int(e)] for e in row] for row in field.z_index.tolist()])
    sd = torch.stack([natural[int(q)] for q in diagonal.scale_index[columns].reshape(-1)])
    return diagonal.mask[:, columns] / sd.reshape(columns.shape) ** 2


def field_sd(field: MarkerField, joint, theta: torch.Tensor) -> torch.Tensor:
    """``[K]`` the current genetic SDs."""
    from pyro_nlme.infer.saem.mstep import _positive_elements

    natural = _positive_elements(joint, theta)
    return torch.stack([natural[int(q)] for q in field.sd_index])


@torch.no_grad()
def gibbs(
    field: MarkerField, plan, joint, theta: torch.Tensor, z: torch.Tensor, copies: int
) -> GibbsDraw:
    """Draw ``g | u`` for every chain (module docs).

    :param z: ``[C * V, D]`` the model's latents (``u`` minus the locations: effects plus
        ``g``), copy-major rows.
    """
    n = joint.n_varieties
    precision = effect_precisions(field, plan, joint, theta)  # [V, K, S]
    sd = field_sd(field, joint, theta)
    vectors, values = field.eigenvectors, field.eigenvalues
    z = z.reshape(copies, n, -1)
    draws, means, quadratic = [], [], []
    for k in range(field.z_index.shape[0]):
        effects = z[:, :, field.z_index[k]]  # [C, V, S]
        weight = precision[:, k]  # [V, S]
        total = weight.sum(-1)  # [V]
        observed = (effects * weight).sum(-1)  # [C, V] = P_v rbar_v
        posterior = genetic_posterior(vectors, values, sd[k], total, observed)
        mean, chol = posterior.mean, posterior.precision_cholesky
        noise = torch.randn(mean.shape, dtype=mean.dtype)
        a = mean + torch.linalg.solve_triangular(chol.T, noise, upper=True)
        second = (mean**2).mean(1) + posterior.variance
        quadratic.append((second / values).sum())
        draws.append((vectors @ a).T)
        means.append((vectors @ mean).T)
    return GibbsDraw(torch.stack(draws, -1), torch.stack(means, -1), torch.stack(quadratic))


def offset(field: MarkerField, genetic: torch.Tensor, z_dim: int) -> torch.Tensor:
    """``[..., V, D]`` the latent offset of genetic values ``[..., V, K]``: ``g[:, k]`` on the
    components ``z_index[k]``."""
    out = genetic.new_zeros(genetic.shape[:-1] + (z_dim,))
    for k in range(field.z_index.shape[0]):
        out[..., field.z_index[k]] = genetic[..., k : k + 1]
    return out


def marker_effects(field: MarkerField, genetic: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` the BLUP back-solve ``Z^T K^+ g / M`` of genetic values ``[V, K]``."""
    return blup_marker_effects(field.markers, genetic)


def start(joint, theta: torch.Tensor, field: MarkerField, copies: int) -> torch.Tensor:
    """Prepare ``joint`` for the kernel form: the marker effects pinned at 0 (model evaluated on
    :class:`PinnedGenotypes`), the genetic values (0 to start) carried by a per-copy offset of
    the effect site; returns ``theta`` with the marker effects set to 0."""
    block = next(b for b in joint.population if b.name == field.site)
    theta = theta.clone()
    theta[block.indices] = 0.0
    joint.data = dataclasses.replace(joint.data, markers=pinned(joint.data.markers))
    joint.clear_rows()
    joint.offset_sites = frozenset({field.effect_site})
    joint.integrated_sites = frozenset({field.site})
    joint.offset = theta.new_zeros(copies, joint.n_varieties, joint.z_dim)
    return theta


def fix(joint, field: MarkerField, state, genetic: torch.Tensor, copies: int):
    """After the iterations: the genetic values fixed at ``genetic`` ``[V, K]`` (every chain),
    the chains' latents moved accordingly; returns the new E-step state."""
    fixed = offset(field, genetic, joint.z_dim)
    u = state.position.reshape(copies, joint.n_varieties, -1) - joint.offset + fixed
    joint.offset = fixed
    return state._replace(position=u.reshape(copies * joint.n_varieties, -1))


LOG_2PI = math.log(2 * math.pi)


def marginal_log_density(field: MarkerField, plan, joint, theta: torch.Tensor, z: torch.Tensor):
    """``[N]``: ``log p(x; theta)`` of the shifted effects plus genetic values ``x`` of ``z``
    ``[N, V, D]`` (each row a draw of every variety's latents, locations removed) with the
    genetic values integrated out.

    Per curve parameter ``k``: ``x[v, s] = g[v] + e[v, s]``, ``e[v, s] ~ Normal(0, 1 / p[v, s])``
    (``p`` from :func:`effect_precisions`, 0 where not scored) and ``g ~ Normal(0, sd_k ** 2
    K)``. Through the precision-weighted variety means ``rbar_v = sum_s p x / P_v``, ``P_v =
    sum_s p[v, s]``, the density factorises exactly::

        sum_v [sum_s (log(p / 2 pi) - p (x - rbar_v) ** 2) / 2 - log(P_v / 2 pi) / 2]
            + log Normal(rbar; 0, sd_k ** 2 K + diag(1 / P))

    over the varieties with ``P_v > 0``; ``K`` is ``V x V``, so this costs one ``V x V``
    Cholesky factorisation per curve parameter.
    """
    precision = effect_precisions(field, plan, joint, theta)  # [V, K, S]
    sd = field_sd(field, joint, theta)
    total = z.new_zeros(z.shape[0])
    for k in range(field.z_index.shape[0]):
        x = z[:, :, field.z_index[k]]  # [N, V, S]
        p = precision[:, k]
        scored, weight = p > 0, p.sum(-1)
        seen = weight > 0
        weight = torch.where(seen, weight, torch.ones_like(weight))
        rbar = (x * p).sum(-1) / weight  # [N, V]
        log_p = torch.where(scored, p, torch.ones_like(p)).log()
        terms = 0.5 * (log_p - LOG_2PI) - 0.5 * p * (x - rbar[..., None]) ** 2
        within = torch.where(scored, terms, torch.zeros_like(terms)).sum(-1)
        normaliser = torch.where(seen, 0.5 * (weight.log() - LOG_2PI), torch.zeros_like(weight))
        within = within - normaliser
        factor = field.eigenvectors[seen].to(z)
        covariance = sd[k] ** 2 * (factor * field.eigenvalues.to(z)) @ factor.T
        covariance = covariance + torch.diag(1 / weight[seen])
        mean = z.new_zeros(int(seen.sum()))
        between = MultivariateNormal(mean, covariance_matrix=covariance).log_prob(rbar[:, seen])
        total = total + within.sum(-1) + between
    return total


def genetic_block(field: MarkerField, plan, joint) -> torch.Tensor:
    """``theta`` indices of the genetic block: the genetic SDs, the SDs of the shifted effects
    and the location parameters that move those effects (module docs)."""
    diagonal = next(g for g in plan.diagonal if g.site == field.effect_site)
    shifted = torch.isin(diagonal.z_index, field.z_index.reshape(-1))
    indices = [field.sd_index, diagonal.scale_index[shifted]]
    if joint.shift is not None:
        moving = torch.isin(joint.shift.z_index, field.z_index.reshape(-1))
        indices.append(joint.shift.theta_index[moving])
    return torch.unique(torch.cat(indices))


class GeneticInformation(NamedTuple):
    """Louis' observed information of the genetic block (module docs).

    :param indices: ``[b]`` its ``theta`` indices (:func:`genetic_block`).
    :param information: ``[b, b]`` on the unconstrained scale, from every chain's draws.
    :param leave_one_chain_out: ``[C, b, b]`` the same without chain ``c`` (``[0, b, b]`` with
        one chain).
    """

    indices: torch.Tensor
    information: torch.Tensor
    leave_one_chain_out: torch.Tensor


def genetic_information(
    field: MarkerField, plan, joint, theta: torch.Tensor, draws: torch.Tensor
) -> GeneticInformation:
    """Louis' information of the genetic block from draws of the centred latents ``u``
    ``[C, N, V, D]`` (``C`` chains, ``N`` sweeps each) of ``p(u | y, theta)``."""
    indices = genetic_block(field, plan, joint)
    n_chains, n_draws = draws.shape[:2]
    origin = draws.new_zeros(draws.shape[-2:])
    one_copy = joint.rows(1)
    sums = []
    for chain in draws:

        def fn(t, chain=chain):
            z = chain + joint.z_from_u(origin, t, one_copy)  # u minus the locations at t
            return marginal_log_density(field, plan, joint, t, z), t.new_zeros(())

        d = derivatives(fn, theta, indices)
        score = d.jacobian  # [N, b]
        sums.append((-d.hessian[:, indices], score.sum(0), score.T @ score))
    neg_hessian, score, outer = (torch.stack(parts) for parts in zip(*sums, strict=True))

    def louis(keep: torch.Tensor) -> torch.Tensor:
        n = keep.sum() * n_draws
        mean = score[keep].sum(0) / n
        info = (neg_hessian[keep].sum(0) - outer[keep].sum(0)) / n + torch.outer(mean, mean)
        return 0.5 * (info + info.T)

    everything = torch.ones(n_chains, dtype=torch.bool)
    full = louis(everything)
    left_out = [
        louis(everything.logical_xor(torch.arange(n_chains) == c))
        for c in range(n_chains if n_chains > 1 else 0)
    ]
    left_out = torch.stack(left_out) if left_out else full.new_zeros((0,) + full.shape)
    return GeneticInformation(indices, full, left_out)
