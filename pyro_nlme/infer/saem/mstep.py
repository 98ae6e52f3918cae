"""The M-step: closed form from sufficient statistics where the model allows it, found by
probing the model through its trace; Newton steps on the rest.

What is closed-form (maximum likelihood only; with ``map=True`` every parameter takes the
gradient path):

1. **Variances of Gaussian individual effects.** An individual site ``Normal(0, s)`` (any
   ``to_event``/``mask``) whose scale entries are each an exact copy of one element of a positive
   population site (e.g. Orange's ``asymptote_effect ~ Normal(0, asymptote_sd)``, g2was's
   ``variety_scenario_effect ~ Normal(0, variety_scenario_sd)``, one SD shared by every
   scenario): ``s_q^2 = sum of the masked mean squares of the centred effects it scales / count``.
2. **Covariances of multivariate Gaussian effects.** An unmasked ``MultivariateNormal(0,
   scale_tril)`` with ``scale_tril = diag(sd) @ L`` (a positive vector site and an LKJ Cholesky
   site, e.g. Soybean) or ``scale_tril`` a lower-Cholesky site: the empirical covariance of the
   centred effects, mapped back to ``sd`` and ``L``.
3. **Location parameters (fixed effects and linear covariate effects).** A real population
   element ``theta_a`` is a location of effect component ``j`` when the rest of the model
   depends on ``(theta_a, z_j)`` only through ``z_ij + c_ia theta_a`` (``c_ia``: 1 for an
   intercept, a covariate value for a covariate effect). This is detected from per-variety
   gradients at two random points and confirmed by an exact shift at a third (see
   :func:`analyse`). The E-step then samples the centred ``u_ij = z_ij + c_ia theta_a``
   (saemix's parametrisation) and ``theta_a`` is a weighted least-squares (or, with a full
   covariance, generalised least-squares) estimate, solved jointly with the variance.
4. **A constant residual SD.** An observed ``Normal(f, s)`` whose scale is one positive
   population element that nothing else uses: ``s^2 = mean squared residual``.

5. **Marker effects and their SDs (the ridge M-step in kernel form).** A site of Gaussian
   marker effects whose genetic values shift Gaussian individual effects is integrated out
   through the genetic values, with ``V x V`` algebra only (:mod:`.field`).

Every other population parameter (e.g. the curve parameters without random effects, a power
variance model's parameters) takes Robbins-Monro Newton steps (Gu & Kong 1998):
``theta_g += gamma_k * H_k^{-1} grad log p(y, u_k; theta)``, with ``H_k`` a stochastic
approximation of the complete-data information. By Fisher's identity the expected gradient is the
score of the marginal likelihood, so the fixed point is the maximum likelihood, like SAEM's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pyro.distributions import MultivariateNormal, Normal
from pyro.distributions.torch_distribution import MaskedDistribution
from torch.distributions import Independent, constraints
from torch.distributions.transforms import ExpTransform, IndependentTransform

from pyro_nlme.infer.saem import field as marker_field
from pyro_nlme.infer.saem.derivatives import derivatives
from pyro_nlme.infer.saem.joint import JointModel, LogDensity, Rows, Shift
from pyro_nlme.infer.util import is_real_support
from pyro_nlme.model.convention import OBSERVED_SITE

ANNEALING_FACTOR = 0.95
"""saemix's simulated annealing: during the first half of the first phase a variance may shrink by
at most this factor per iteration."""
MAX_LOCATION_SITE_SIZE = 1000
"""Population sites with more elements (e.g. marker effects) are not probed as locations."""
MAX_GRADIENT_SIZE = 200
"""The gradient path forms a ``k x k`` information matrix per iteration (``k`` backward passes):
a model with more such elements is refused with the names of its sites."""


@dataclass(frozen=True)
class DiagonalGaussian:
    """Closed-form variances of a ``Normal(0, s)`` individual site.

    :param z_index: ``[E]`` the site's components in the flat latent vector.
    :param scale_index: ``[E]`` the ``theta`` element each component's SD copies.
    :param mask: ``[V, E]`` 1 where the component is scored.
    """

    site: str
    z_index: torch.Tensor
    scale_index: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class FullGaussian:
    """Closed-form covariance of a ``MultivariateNormal(0, scale_tril)`` individual site, with
    ``scale_tril = diag(sd_site) @ corr_site`` or ``scale_tril = chol_site``."""

    site: str
    z_index: torch.Tensor
    sd_site: str | None = None
    corr_site: str | None = None
    chol_site: str | None = None


@dataclass(frozen=True)
class Plan:
    """Which parameters the M-step solves in closed form and which take Newton steps.

    :param closed_form: ``theta`` indices solved in closed form.
    :param gradient: the other ``theta`` indices.
    :param noise_index: ``theta`` index of a closed-form residual SD, if any.
    :param marker_field: marker effects integrated out through their genetic values.
    """

    diagonal: list[DiagonalGaussian] = field(default_factory=list)
    full: list[FullGaussian] = field(default_factory=list)
    noise_index: int | None = None
    shift: Shift | None = None
    closed_form: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    gradient: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    marker_field: marker_field.MarkerField | None = None

    def describe(self, labels: list[str]) -> dict[str, list[str]]:
        """Parameter labels by M-step kind (``labels`` indexed by ``theta`` position)."""
        return {
            "closed_form": [labels[i] for i in self.closed_form.tolist()],
            "gradient": [labels[i] for i in self.gradient.tolist()],
        }


def unwrap(fn) -> tuple[object, torch.Tensor | None, int]:
    """The base distribution under ``Independent`` and ``mask`` wrappers, the mask (or None) and
    the number of event dims added by ``Independent``."""
    mask, reinterpreted = None, 0
    while True:
        if isinstance(fn, MaskedDistribution):
            mask = fn._mask if mask is None else mask & fn._mask
            fn = fn.base_dist
        elif isinstance(fn, Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        else:
            return fn, mask, reinterpreted


def _positive_elements(joint: JointModel, theta: torch.Tensor) -> dict[int, torch.Tensor]:
    """``theta`` index -> natural value, for elementwise exp-transformed (positive) sites."""
    out = {}
    values = joint.population_values(theta)
    for b in joint.population:
        transform = b.transform
        while isinstance(transform, IndependentTransform):
            transform = transform.base_transform
        parts = getattr(transform, "parts", [transform])
        if b.shape != b.unconstrained_shape or not any(isinstance(p, ExpTransform) for p in parts):
            continue
        flat = values[b.name].reshape(-1)
        for k in range(b.size):
            out[b.offset + k] = flat[k]
    return out


def _copied_element(
    columns: list[torch.Tensor], elements: list[dict[int, torch.Tensor]]
) -> int | None:
    """The ``theta`` index whose natural value equals every entry of ``columns[p]`` at probe
    ``p`` (for all probes), or None."""
    for q in elements[0]:
        if all(
            torch.allclose(col, torch.full_like(col, float(el[q])), rtol=1e-10, atol=0.0)
            for col, el in zip(columns, elements, strict=True)
        ):
            return q
    return None


def _probes(joint: JointModel, theta: torch.Tensor, n: int, generator: torch.Generator):
    """``n`` random points near ``theta``: each element moved by about 0.3, except in sites
    with more elements than varieties (marker effects), moved by ``0.3 / sqrt(size)`` so that
    their sum over markers, a genetic value, moves by about 0.3 too. Moved by 0.3 each, 60,000
    effects gave genetic values of SD 70, saturated every curve, and the location probes of
    the log rate and inflection means failed (they were left to the slow gradient M-step)."""
    spread = torch.full_like(theta, 0.3)
    for block in joint.population:
        if block.size > joint.n_varieties:
            spread[block.offset : block.offset + block.size] = 0.3 / block.size**0.5
    return [
        theta + spread * torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        for _ in range(n)
    ]


@torch.no_grad()
def _site_terms(joint: JointModel, theta: torch.Tensor, z: torch.Tensor, rows: Rows):
    density = joint.log_density(theta, z, rows)
    return {**density.sites, OBSERVED_SITE: density.obs}


def _only_affects(joint, theta, z, rows, index: int, site: str) -> bool:
    """Whether perturbing ``theta[index]`` changes the term of ``site`` and no other."""
    before = _site_terms(joint, theta, z, rows)
    moved = theta.clone()
    moved[index] += 0.1
    after = _site_terms(joint, moved, z, rows)
    changed = {name for name in before if not torch.allclose(before[name], after[name], rtol=1e-12)}
    return changed == {site}


def analyse(
    joint: JointModel, theta: torch.Tensor, map_estimate: bool = False, seed: int = 0
) -> Plan:
    """Probe the model and decide the M-step of every population parameter (module docs).

    Sets ``joint.shift`` (the centring) as a side effect and returns the plan.
    """
    joint.shift = None
    generator = torch.Generator().manual_seed(seed)
    rows = joint.rows(1)
    probes = _probes(joint, theta, 3, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        zs = [joint.sample_prior(p, rows) for p in probes]
    traces = [joint.trace(p, z, rows) for p, z in zip(probes, zs, strict=True)]
    elements = [_positive_elements(joint, p) for p in probes[:2]]
    individual = {b.name: b for b in joint.individual}
    population = {b.name: b for b in joint.population}
    n = joint.n_varieties
    diagonal, full = [], []
    for name, block in individual.items():
        fns = [unwrap(t.nodes[name]["fn"]) for t in traces[:2]]
        base, mask, _ = fns[0]
        value = traces[0].nodes[name]["value"]
        z_index = torch.arange(block.offset, block.offset + block.size)
        if isinstance(base, Normal) and all(not f[0].loc.any() for f in fns):
            columns = [f[0].scale.expand(value.shape).reshape(n, -1) for f in fns]
            scale_index = []
            for e in range(block.size):
                q = _copied_element([c[:, e] for c in columns], elements)
                if q is None or not _only_affects(joint, probes[0], zs[0], rows, q, name):
                    break
                scale_index.append(q)
            else:
                if mask is None:
                    weight = torch.ones(n, block.size, dtype=joint.dtype)
                else:
                    event = value.dim() - mask.dim()
                    expanded = mask.reshape(mask.shape + (1,) * max(event, 0)).expand(value.shape)
                    weight = expanded.reshape(n, -1).to(joint.dtype)
                diagonal.append(DiagonalGaussian(name, z_index, torch.tensor(scale_index), weight))
        elif isinstance(base, MultivariateNormal) and mask is None and not base.loc.any():
            plan = _full_gaussian(joint, name, z_index, probes[0], zs[0], rows, population)
            if plan is not None:
                full.append(plan)
    noise_index = _noise_index(joint, traces[:2], elements, probes[0], zs[0], rows)
    markers = marker_field.detect(joint, probes, zs, rows, diagonal, elements, unwrap)
    if markers is not None and map_estimate:
        raise ValueError(
            f"MAP with marker effects ({markers.site!r}) is not supported: the kernel-form "
            "M-step integrates them out (maximum likelihood only)"
        )
    gaussian_components = {int(i): g.site for g in diagonal + full for i in g.z_index.tolist()}
    shift = None
    if gaussian_components:
        excluded = {markers.site} if markers is not None else set()
        shift = _locations(joint, probes, zs, rows, gaussian_components, diagonal, full, excluded)
    joint.shift = shift
    closed: list[int] = []
    if markers is not None:
        closed += markers.sd_index.tolist()
        closed += list(
            range(
                population[markers.site].offset,
                population[markers.site].offset + population[markers.site].size,
            )
        )
    if not map_estimate:
        for g in diagonal:
            closed += g.scale_index.tolist()
        for g in full:
            for site in (g.sd_site, g.corr_site, g.chol_site):
                if site is not None:
                    b = population[site]
                    closed += list(range(b.offset, b.offset + b.size))
        if noise_index is not None:
            closed.append(noise_index)
        if shift is not None:
            closed += shift.theta_index.tolist()
    closed_set = set(closed)
    closed_form = torch.tensor(sorted(closed_set), dtype=torch.long)
    gradient = torch.tensor(
        [i for i in range(joint.theta_dim) if i not in closed_set], dtype=torch.long
    )
    if map_estimate:
        diagonal, full, noise_index = [], [], None
    on_gradient = set(gradient.tolist())
    large = [
        b
        for b in joint.population
        if b.size > joint.n_varieties and any(i in on_gradient for i in range(*_span(b)))
    ]
    if gradient.numel() > MAX_GRADIENT_SIZE or large:
        names = ", ".join(f"{b.name} ({b.size} elements)" for b in large) or "(several sites)"
        raise ValueError(
            f"{gradient.numel()} population elements would take SAEM's gradient M-step, "
            f"including sites with more elements than varieties: {names}. Such sites are random "
            "effects that maximum likelihood would treat as free parameters (and a "
            f"{gradient.numel()} x {gradient.numel()} information per iteration). Marker "
            "effects are integrated out in the effects form only (g2was: marker_form='effects')"
            ", not as kinship-form latents"
        )
    return Plan(diagonal, full, noise_index, shift, closed_form, gradient, markers)


def _span(block) -> tuple[int, int]:
    return block.offset, block.offset + block.size


def _full_gaussian(joint, name, z_index, theta, z, rows, population) -> FullGaussian | None:
    """Which population sites parametrise a multivariate Gaussian site's ``scale_tril``."""

    def scale_tril(t):
        return unwrap(joint.trace(t, z, rows).nodes[name]["fn"])[0].scale_tril

    reference = scale_tril(theta)
    depends = []
    for b in joint.population:
        moved = theta.clone()
        moved[b.indices] += 0.1
        if not torch.allclose(scale_tril(moved), reference, rtol=1e-12):
            depends.append(b)
    d = int(z_index.numel())
    kinds = {b.support for b in depends}
    plan = None
    if len(depends) == 1 and depends[0].support is constraints.lower_cholesky:
        plan = FullGaussian(name, z_index, chol_site=depends[0].name)
    elif len(depends) == 2 and constraints.corr_cholesky in kinds:
        corr = next(b for b in depends if b.support is constraints.corr_cholesky)
        sd = next(b for b in depends if b is not corr)
        if sd.shape == (d,) and corr.shape == (d, d):
            plan = FullGaussian(name, z_index, sd_site=sd.name, corr_site=corr.name)
    if plan is None:
        return None
    # Confirm the parametrisation on a random covariance.
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, generator=generator, dtype=joint.dtype)
    covariance = a @ a.T + d * torch.eye(d, dtype=joint.dtype)
    moved = set_covariance(joint, theta, plan, covariance)
    tril = scale_tril(moved)
    tril = tril.reshape(-1, d, d)[0]
    if not torch.allclose(tril @ tril.T, covariance, rtol=1e-8):
        return None
    sites = [s for s in (plan.sd_site, plan.corr_site, plan.chol_site) if s]
    for site in sites:
        b = population[site]
        for index in range(b.offset, b.offset + b.size):
            if not _only_affects(joint, theta, z, rows, index, name):
                return None
    return plan


def _noise_index(joint, traces, elements, theta, z, rows) -> int | None:
    base, _, _ = unwrap(traces[0].nodes[OBSERVED_SITE]["fn"])
    if not isinstance(base, Normal):
        return None
    columns = []
    for t in traces:
        b, _, _ = unwrap(t.nodes[OBSERVED_SITE]["fn"])
        columns.append(b.scale.expand(t.nodes[OBSERVED_SITE]["value"].shape).reshape(-1))
    q = _copied_element(columns, elements)
    if q is None or not _only_affects(joint, theta, z, rows, q, OBSERVED_SITE):
        return None
    return q


def _locations(
    joint, probes, zs, rows, gaussian_components, diagonal, full, excluded
) -> Shift | None:
    """Detect the location parameters of the Gaussian components (module docs, item 3)."""
    gaussian_sites = {g.site for g in diagonal + full}
    scale_sites = set()
    for g in full:
        scale_sites |= {s for s in (g.sd_site, g.corr_site, g.chol_site) if s}
    scale_indices = {int(i) for g in diagonal for i in g.scale_index.tolist()}
    candidates = []
    for b in joint.population:
        if not is_real_support(b.support):
            continue
        if b.size > MAX_LOCATION_SITE_SIZE or b.name in scale_sites | excluded:
            continue
        candidates += [i for i in range(b.offset, b.offset + b.size) if i not in scale_indices]
    if not candidates:
        return None

    def rest(theta, z):
        density = joint.log_density(theta, z, rows)
        gaussian = sum((density.sites[s] for s in gaussian_sites), torch.zeros_like(density.obs))
        return density.total - gaussian

    jac_theta, jac_z = [], []
    for theta, z in zip(probes[:2], zs[:2], strict=True):
        d = derivatives(lambda t, z=z: (rest(t, z), torch.zeros(())), theta, candidates)
        jac_theta.append(d.jacobian)
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(rest(theta, x).sum(), x)
        jac_z.append(g)
    components = sorted(gaussian_components)
    theta_index, z_index, coefs = [], [], []
    for k, a in enumerate(candidates):
        ja = [j[:, k] for j in jac_theta]
        if all(torch.all(j.abs() < 1e-12) for j in ja):
            continue
        best = None
        for e in components:
            je = [j[:, e] for j in jac_z]
            # Each probe on its own varieties: where the component's gradient vanishes (a
            # saturated curve), the parameter's must vanish too; elsewhere their ratio is the
            # coefficient, the same at both probes where both see it.
            valid = [je[p].abs() > 1e-9 for p in (0, 1)]
            if not (valid[0] | valid[1]).any():
                continue
            if any(
                torch.any(ja[p][~valid[p]].abs() > 1e-9 * (1 + ja[p].abs().max())) for p in (0, 1)
            ):
                continue
            ratios = [
                torch.where(valid[p], ja[p] / torch.where(valid[p], je[p], 1.0), 0.0)
                for p in (0, 1)
            ]
            both = valid[0] & valid[1]
            if torch.allclose(ratios[0][both], ratios[1][both], rtol=1e-6, atol=1e-9):
                best = (e, torch.where(valid[0], ratios[0], ratios[1]))
                break
        if best is None:
            continue
        e, coef = best
        if _shift_holds(joint, rest, probes[2], zs[2], a, e, coef) and _not_in_gaussian(
            joint, probes[2], zs[2], rows, a, gaussian_sites
        ):
            theta_index.append(a)
            z_index.append(e)
            coefs.append(coef)
    if not theta_index:
        return None
    return Shift(torch.tensor(theta_index), torch.tensor(z_index), torch.stack(coefs, 1))


@torch.no_grad()
def _shift_holds(joint, rest, theta, z, a, e, coef) -> bool:
    """``rest(theta + delta e_a, z - delta coef e_e) == rest(theta, z)`` for every variety."""
    delta = 0.5
    moved_theta = theta.clone()
    moved_theta[a] += delta
    moved_z = z.clone()
    moved_z[:, e] -= delta * coef
    base, unshifted, shifted = rest(theta, z), rest(moved_theta, z), rest(moved_theta, moved_z)
    change = (unshifted - base).abs()
    return bool(torch.all((shifted - base).abs() <= 1e-7 * (1 + change + base.abs())))


@torch.no_grad()
def _not_in_gaussian(joint, theta, z, rows, a, sites) -> bool:
    before = _site_terms(joint, theta, z, rows)
    moved = theta.clone()
    moved[a] += 0.1
    after = _site_terms(joint, moved, z, rows)
    return all(torch.allclose(before[s], after[s], rtol=1e-12) for s in sites)


# -- sufficient statistics and the closed-form solution --------------------------------------


def statistics(
    plan: Plan, u: torch.Tensor, density: LogDensity, rows: Rows, n_copies: int, n: int
) -> dict[str, torch.Tensor]:
    """Sufficient statistics of one E-step draw, averaged over the ``n_copies`` chains.

    :param u: ``[n_copies * V, D]`` centred latents (copy-major rows).
    :param density: the log-density at ``u`` (its trace gives the residuals).
    """
    stats = {}
    u = u.reshape(n_copies, n, -1)
    for g in plan.diagonal:
        x = u[:, :, g.z_index]
        stats[f"{g.site}:s1"] = x.mean(0)
        stats[f"{g.site}:s2"] = (g.mask * (x**2).mean(0)).sum(0)
    for g in plan.full:
        x = u[:, :, g.z_index]
        stats[f"{g.site}:s1"] = x.mean(0)
        stats[f"{g.site}:s2"] = torch.einsum("cvi,cvj->ij", x, x) / n_copies
    if plan.noise_index is not None:
        node = density.trace.nodes[OBSERVED_SITE]
        base, mask, _ = unwrap(node["fn"])
        residual = (node["value"] - base.loc) ** 2
        if mask is not None:
            residual = residual * mask
        stats["noise:rss"] = residual.sum() / n_copies
    return stats


def _set_natural(joint: JointModel, theta: torch.Tensor, updates: dict[int, float]) -> torch.Tensor:
    """``theta`` with the natural values of some elementwise-transformed elements replaced."""
    theta = theta.clone()
    for b in joint.population:
        inside = {i: v for i, v in updates.items() if b.offset <= i < b.offset + b.size}
        if not inside:
            continue
        value = b.transform(theta[b.indices].reshape(b.unconstrained_shape)).reshape(-1).clone()
        for i, v in inside.items():
            value[i - b.offset] = v
        theta[b.indices] = b.transform.inv(value.reshape(b.shape)).reshape(-1)
    return theta


def set_covariance(joint: JointModel, theta, plan: FullGaussian, covariance) -> torch.Tensor:
    """``theta`` with a multivariate site's covariance set (through its own parametrisation)."""
    values = joint.population_values(theta)
    if plan.chol_site is not None:
        values[plan.chol_site] = torch.linalg.cholesky(covariance)
    else:
        sd = covariance.diagonal().sqrt()
        corr = covariance / (sd[:, None] * sd[None, :])
        values[plan.sd_site] = sd
        values[plan.corr_site] = torch.linalg.cholesky(corr)
    theta = theta.clone()
    for b in joint.population:
        if b.name in (plan.sd_site, plan.corr_site, plan.chol_site):
            theta[b.indices] = b.transform.inv(values[b.name]).reshape(-1)
    return theta


def covariance_of(joint: JointModel, theta, plan: FullGaussian) -> torch.Tensor:
    values = joint.population_values(theta)
    if plan.chol_site is not None:
        tril = values[plan.chol_site]
    else:
        tril = values[plan.sd_site][:, None] * values[plan.corr_site]
    return tril @ tril.T


def solve(
    joint: JointModel,
    plan: Plan,
    stats: dict[str, torch.Tensor],
    theta: torch.Tensor,
    n_observed: int,
    anneal: bool = False,
) -> torch.Tensor:
    """The closed-form maximiser of the expected complete-data log-likelihood given the
    statistics, for the closed-form parameters (the others are kept)."""
    theta = theta.clone()
    shift = plan.shift
    natural: dict[int, float] = {}
    previous = _positive_elements(joint, theta)
    for g in plan.diagonal:
        s1, s2 = stats[f"{g.site}:s1"], stats[f"{g.site}:s2"]
        ssr = torch.zeros(len(g.z_index), dtype=theta.dtype)
        for k, e in enumerate(g.z_index.tolist()):
            m = g.mask[:, k]
            ssr[k] = s2[k]
            if shift is not None:
                located = (shift.z_index == e).nonzero().flatten()
                if located.numel():
                    x = shift.coef[:, located]
                    gram = x.T @ (m[:, None] * x)
                    cross = x.T @ (m * s1[:, k])
                    beta = torch.linalg.solve(gram, cross)
                    theta[shift.theta_index[located]] = beta
                    ssr[k] = s2[k] - 2 * beta @ cross + beta @ gram @ beta
        for q in g.scale_index.unique().tolist():
            members = g.scale_index == q
            variance = ssr[members].sum() / g.mask[:, members].sum().clamp(min=1)
            if anneal:
                variance = torch.maximum(variance, ANNEALING_FACTOR * previous[q] ** 2)
            natural[q] = float(variance.clamp(min=1e-12).sqrt())
    if plan.marker_field is not None:
        f = plan.marker_field
        for k, q in enumerate(f.sd_index.tolist()):
            variance = stats["marker_field:quadratic"][k] / f.rank
            if anneal:
                variance = torch.maximum(variance, ANNEALING_FACTOR * previous[q] ** 2)
            natural[q] = float(variance.clamp(min=1e-12).sqrt())
    for g in plan.full:
        theta = _solve_full(joint, plan, g, stats, theta, anneal)
    if plan.noise_index is not None:
        variance = stats["noise:rss"] / n_observed
        if anneal:
            variance = torch.maximum(variance, ANNEALING_FACTOR * previous[plan.noise_index] ** 2)
        natural[plan.noise_index] = float(variance.clamp(min=1e-12).sqrt())
    return _set_natural(joint, theta, natural)


def _solve_full(joint, plan: Plan, g: FullGaussian, stats, theta, anneal, sweeps: int = 50):
    s1, s2 = stats[f"{g.site}:s1"], stats[f"{g.site}:s2"]
    n, d = s1.shape
    shift = plan.shift
    components = g.z_index.tolist()
    located = []
    if shift is not None:
        located = [i for i, e in enumerate(shift.z_index.tolist()) if e in components]
    old = covariance_of(joint, theta, g)
    covariance = old
    if located:
        design = torch.zeros(n, d, len(located), dtype=theta.dtype)
        for k, i in enumerate(located):
            design[:, components.index(int(shift.z_index[i])), k] = shift.coef[:, i]
        for _ in range(sweeps):
            precision = torch.linalg.inv(covariance)
            gram = torch.einsum("vdk,de,vel->kl", design, precision, design)
            cross = torch.einsum("vdk,de,ve->k", design, precision, s1)
            beta = torch.linalg.solve(gram, cross)
            mean = design @ beta
            new = (s2 - mean.T @ s1 - s1.T @ mean + mean.T @ mean) / n
            done = torch.allclose(new, covariance, rtol=1e-10, atol=0)
            covariance = 0.5 * (new + new.T)
            if done:
                break
        theta[shift.theta_index[located]] = beta
    else:
        covariance = s2 / n
    if anneal:
        floor = (ANNEALING_FACTOR * old.diagonal()).sqrt()
        sd = covariance.diagonal().sqrt()
        factor = torch.maximum(sd, floor) / sd
        covariance = covariance * factor[:, None] * factor[None, :]
    covariance = covariance + 1e-10 * torch.eye(d, dtype=theta.dtype)
    return set_covariance(joint, theta, g, covariance)
