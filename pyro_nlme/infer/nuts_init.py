"""Where NUTS chains start, and with which mass matrix: a Laplace approximation of the density
NUTS samples, at its mode found by L-BFGS.

Pyro's default start fails on vague priors. ``init_to_median`` takes the median of 15 *prior
draws*, which for Orange's ``Normal(214, 2140)`` asymptote prior lands hundreds of mm from the
prior's own median; a chain started there with an identity mass matrix spends its first
adaptation window (75 iterations) far out with one step size for latents whose posterior SDs
span four orders of magnitude (0.05 for a log-scale SD, 40 days for an inflection), the first
mass-matrix window then estimates variances from that transient, and the chain either collapses
its step size or stays in a far ridge that the vague priors allow (docs/nuts.md). An SVI start
does not cure it: Adam moves each unconstrained coordinate by about its learning rate per step,
so a latent in days needs thousands of steps to travel a hundred days.

Here every chain starts from a quasi-Newton fit, which is scale-free:

1. the exact prior median of every site (``icdf(0.5)``; the median of prior draws where a
   distribution has no ``icdf``);
2. L-BFGS (strong Wolfe line search) on the potential energy, the negative log density on the
   unconstrained space with its Jacobians, the space and density Pyro's HMC uses;
3. the Hessian there: its inverse is the Laplace covariance, the first window's inverse mass
   matrix (dense), or the inverse of its diagonal (for large models, where the diagonal comes
   from Hessian-vector products with Rademacher probes; when the mode was searched in another
   parametrisation, the variances of the search space's Gaussian pushed through the map);
4. chain ``c`` starts at a draw of that Gaussian (seeded), so chains start apart.

It only sets where the warm-up starts and the first window's metric; the warm-up still adapts
both, and the draws are NUTS's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.optim import ClippedAdam

from pyro_nlme.data import NLMEData

INIT_MEDIAN_DRAWS = 15
DIAGONAL_PROBES = 32
MIN_CURVATURE = 1e-8
PUSHFORWARD_DRAWS = 200


def init_to_prior_median(site: dict | None = None):
    """Pyro init strategy: the exact median of the site's prior (``icdf(0.5)`` of the base
    distribution under ``Independent``/``Masked`` wrappers, broadcast to the site's shape),
    else the median of :data:`INIT_MEDIAN_DRAWS` prior draws (``init_to_median``)."""
    if site is None:
        return init_to_prior_median
    fn = site["fn"]
    base = fn
    while isinstance(base, (dist.Independent, dist.MaskedDistribution)):
        base = base.base_dist
    try:
        median = base.icdf(torch.full(base.batch_shape, 0.5).to(base.mean))
    except (NotImplementedError, AttributeError, ValueError):
        return init_to_median(site, num_samples=INIT_MEDIAN_DRAWS)
    shape = fn.batch_shape + fn.event_shape
    if not torch.isfinite(median).all() or not fn.support.check(median.expand(shape)).all():
        return init_to_median(site, num_samples=INIT_MEDIAN_DRAWS)
    return median.expand(shape).clone()


@dataclass(frozen=True)
class ChainStart:
    """A Gaussian on the unconstrained space of a model's sampled sites, flattened.

    :param loc: ``[N]`` location (the mode), the sites' unconstrained values concatenated.
    :param covariance: ``[N, N]`` covariance, or ``[N]`` variances.
    :param index: site -> its slice of the flat vector.
    :param shapes: site -> unconstrained shape.
    :param transforms: site -> bijection from the unconstrained space to the site's support
        (those of Pyro's HMC).
    :param potential_energy: potential energy at ``loc`` (nats).
    """

    loc: torch.Tensor
    covariance: torch.Tensor
    index: dict[str, slice]
    shapes: dict[str, torch.Size]
    transforms: dict[str, object]
    potential_energy: float

    def draw(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One draw of every site, constrained (``init_to_value`` values): a chain's start."""
        noise = torch.randn(
            self.loc.shape, generator=generator, dtype=torch.float64, device=generator.device
        )
        noise = noise.to(self.loc)
        if self.covariance.dim() == 1:
            flat = self.loc + self.covariance.sqrt() * noise
        else:
            flat = self.loc + torch.linalg.cholesky(self.covariance) @ noise
        return {
            name: self.transforms[name](flat[where].reshape(self.shapes[name]))
            for name, where in self.index.items()
        }

    def inverse_mass_matrix(self, blocks: Mapping[tuple[str, ...], bool]) -> dict:
        """The covariance as Pyro's block inverse mass matrix.

        :param blocks: block (tuple of site names, flattened in that order, as
            :class:`~pyro.infer.mcmc.adaptation.BlockMassMatrix` does) -> whether it is dense.
        :returns: block -> ``[n, n]`` sub-covariance (dense block) or ``[n]`` variances.
        """
        out = {}
        for sites, dense in blocks.items():
            rows = torch.cat(
                [torch.arange(self.index[n].start, self.index[n].stop) for n in sites]
            ).to(self.loc.device)
            if self.covariance.dim() == 1:
                variance = self.covariance[rows]
                out[sites] = torch.diag(variance) if dense else variance
            else:
                block = self.covariance[rows][:, rows]
                out[sites] = block if dense else block.diagonal()
        return out


def _positive_definite_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric matrix with its eigenvalues clipped below at
    :data:`MIN_CURVATURE` times the largest (a saddle or flat direction gets a wide but finite
    variance instead of a negative one)."""
    values, vectors = torch.linalg.eigh((hessian + hessian.T) / 2)
    values = values.clamp(min=MIN_CURVATURE * values.abs().max())
    return (vectors / values) @ vectors.T


def _flat_potential(model: Callable, data: NLMEData, init_strategy, model_kwargs: dict):
    """Pyro's potential energy of ``model`` as a function of one flat unconstrained vector:
    ``(potential, start, index, shapes, transforms)``."""
    params, potential_fn, transforms, _ = initialize_model(
        model, model_args=(data,), model_kwargs=model_kwargs, init_strategy=init_strategy
    )
    shapes = {name: value.shape for name, value in params.items()}
    index, offset = {}, 0
    for name, shape in shapes.items():
        index[name] = slice(offset, offset + shape.numel())
        offset += shape.numel()

    def potential(flat: torch.Tensor) -> torch.Tensor:
        return potential_fn({n: flat[w].reshape(shapes[n]) for n, w in index.items()})

    start = torch.cat([value.detach().reshape(-1) for value in params.values()])
    # Pyro's HMC transforms map a site's support to the real space; ChainStart keeps the inverse.
    return potential, start, index, shapes, {n: t.inv for n, t in transforms.items()}


def _minimise(potential: Callable, start: torch.Tensor, max_iterations: int) -> torch.Tensor:
    flat = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([flat], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        energy = potential(flat)
        energy.backward()
        return energy

    optimiser.step(closure)
    return flat.detach()


def laplace_start(
    model: Callable,
    data: NLMEData,
    *,
    dense: bool,
    search_model: Callable | None = None,
    max_iterations: int = 500,
    refine_steps: int = 0,
    seed: int = 0,
    **model_kwargs,
) -> ChainStart:
    """Laplace approximation of the density NUTS samples (see the module docstring).

    :param model: the model NUTS samples (after any reparametrisation), ``model(data, **kw)``.
    :param dense: return the full inverse Hessian (``N`` Hessian-vector products; for small
        models), else the inverse of the Hessian's diagonal (estimated from
        :data:`DIAGONAL_PROBES` Rademacher probes), or with a ``search_model`` the variances of
        the search space's diagonal Gaussian pushed through the map (from
        :data:`PUSHFORWARD_DRAWS` draws).
    :param search_model: the same model in the parametrisation whose mode is searched (None:
        ``model``). A centred hierarchy has no mode (its density grows without bound as a
        random-effect SD goes to 0 with the effects: L-BFGS follows that funnel to SD
        ``1e-20``), its non-centred form has one; the mode found there is mapped to ``model``'s
        sites by replaying ``search_model`` (which must record ``model``'s sampled sites, as
        :class:`~pyro.infer.reparam.LocScaleReparam` does). Dense: the covariance is the search
        space's Laplace covariance pushed through that map's Jacobian; diagonal: the variances
        of the search space's diagonal Gaussian (refined, or from the inverse of its Hessian's
        diagonal) pushed through the map by draws.
    :param max_iterations: L-BFGS iterations (each a few gradients).
    :param refine_steps: if positive, a mean-field Gaussian
        (:class:`~pyro.infer.autoguide.AutoNormal`, started at the mode with SD 0.1) is then fitted
        to the search density by that many ``ClippedAdam`` steps (learning rate 0.02), and its
        median and variances replace the mode and the inverse Hessian (pushed through the map
        as above when dense). The joint mode of a non-centred hierarchy sits where the
        random-effect SDs are inflated and the standardised effects shrunk (6 simulated
        varieties: inflection SDs of 5 to 7 days against a truth of 1); the ELBO's entropy
        term pulls them back (1.6 days after 1,000 steps).
    :param seed: seeds the probes and the fallback prior draws; the global RNG state is
        restored afterwards.
    """
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        pyro.set_rng_seed(seed)
        potential, flat, index, shapes, transforms = _flat_potential(
            model, data, init_to_prior_median, model_kwargs
        )
        if search_model is None:
            search_model, search = model, (potential, flat, index, shapes, transforms)
        else:
            search = _flat_potential(search_model, data, init_to_prior_median, model_kwargs)
        search_potential, search_flat, search_index, search_shapes, search_transforms = search
        mode = _minimise(search_potential, search_flat, max_iterations)
        search_covariance = None
        if refine_steps:
            mode, search_covariance = _refine(
                search_model,
                data,
                mode,
                search_index,
                search_shapes,
                search_transforms,
                refine_steps,
                model_kwargs,
            )

        def to_model(point: torch.Tensor) -> torch.Tensor:
            values = {
                n: search_transforms[n](point[w].reshape(search_shapes[n]))
                for n, w in search_index.items()
            }
            conditioned = poutine.condition(search_model, data=values)
            trace = poutine.trace(conditioned).get_trace(data, **model_kwargs)
            return torch.cat(
                [transforms[n].inv(trace.nodes[n]["value"]).reshape(-1) for n in index]
            )

        same_space = search_model is model
        loc = mode if same_space else to_model(mode).detach().to(flat)
        energy = float(potential(loc))
        if same_space and search_covariance is not None:
            covariance = torch.diag(search_covariance) if dense else search_covariance
        elif same_space and dense:
            covariance = _positive_definite_inverse(
                torch.autograd.functional.hessian(potential, loc)
            )
        elif dense:
            # Push the search space's covariance forward through the map: at a point that is
            # not a mode of ``model``'s density its Hessian need not be positive.
            if search_covariance is None:
                search_hessian = torch.autograd.functional.hessian(search_potential, mode)
                search_covariance = _positive_definite_inverse(search_hessian)
            else:
                search_covariance = torch.diag(search_covariance)
            jacobian = torch.autograd.functional.jacobian(to_model, mode)
            covariance = jacobian @ search_covariance @ jacobian.T
        elif same_space:
            covariance = 1 / _hessian_diagonal(potential, loc).clamp(min=MIN_CURVATURE)
        else:
            # The mapped point is not a mode of ``model``'s density and a centred hierarchy's
            # Hessian has large off-diagonal terms: Hutchinson's estimate of its diagonal went
            # negative for 342 of 7,519 coordinates of the target design (clamped: variance
            # 1e8, chains started 1e4 away). Push the search space's Gaussian forward instead.
            if search_covariance is None:
                search_covariance = 1 / _hessian_diagonal(search_potential, mode).clamp(
                    min=MIN_CURVATURE
                )
            covariance = _pushforward_variance(to_model, mode, search_covariance).to(flat)
    return ChainStart(loc, covariance, index, shapes, transforms, energy)


def _refine(model, data, mode, index, shapes, to_constrained, steps, model_kwargs):
    """Median and variances (flat, unconstrained) of an ``AutoNormal`` fitted to ``model`` from
    ``mode`` by ``steps`` ClippedAdam steps; the parameter store is left as it was."""
    values = {n: to_constrained[n](mode[w].reshape(shapes[n])) for n, w in index.items()}
    with pyro.get_param_store().scope():
        guide = AutoNormal(model, init_loc_fn=init_to_value(values=values), init_scale=0.1)
        svi = SVI(model, guide, ClippedAdam({"lr": 0.02}), Trace_ELBO())
        for _ in range(steps):
            svi.step(data, **model_kwargs)
        pairs = [guide._get_loc_and_scale(n) for n in index]
        loc = torch.cat([pair[0].detach().reshape(-1) for pair in pairs]).to(mode)
        variance = torch.cat([pair[1].detach().reshape(-1) for pair in pairs]).to(mode) ** 2
    return loc, variance


@torch.no_grad()
def _pushforward_variance(
    to_model: Callable, loc: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """Variance of every coordinate of ``to_model(x)``, ``x ~ N(loc, diag(variance))``, from
    :data:`PUSHFORWARD_DRAWS` draws (relative standard error ``sqrt(2 / (draws - 1))``, 10%)."""
    noise = torch.randn((PUSHFORWARD_DRAWS,) + loc.shape, dtype=torch.float64).to(loc)
    mapped = torch.stack([to_model(loc + variance.sqrt() * eps) for eps in noise])
    return mapped.var(dim=0)


def _hessian_diagonal(potential: Callable, point: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate ``mean(v * H v)`` of the Hessian's diagonal, ``v`` Rademacher."""
    total = torch.zeros_like(point)
    for _ in range(DIAGONAL_PROBES):
        probe = torch.randint(0, 2, point.shape).to(point) * 2 - 1
        _, product = torch.autograd.functional.hvp(potential, point, probe)
        total += probe * product
    return total / DIAGONAL_PROBES
