"""Machinery every engine shares: reading a model's structure off one trace, and replaying the
model on posterior draws (log-likelihood per observation, predictive samples, deterministic
sites). Engines never parse a model's source: they run it under Pyro's effect handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import NLMEData
from pyro_nlme.model.convention import OBSERVED_SITE, VARIETY_PLATE, model_event_dims


def base_distribution(fn: dist.Distribution) -> dist.Distribution:
    """``fn`` without its ``Independent``, ``Expanded`` and ``Masked`` wrappers (which keep
    the elementwise distribution; a transformed distribution is not unwrapped)."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist
    return fn


def is_real_support(support: constraints.Constraint) -> bool:
    """Whether a site's support is the real line, elementwise (``real`` or ``independent(real,
    n)``): its unconstrained value is its value."""
    return support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    )


@dataclass(frozen=True)
class SiteInfo:
    """One site of a model, as traced on the full data (no subsampling).

    :param shape: value shape.
    :param event_dim: number of rightmost event dimensions.
    :param plate_dims: negative batch dim -> plate name, for the plates enclosing the site.
    :param support: the distribution's support (for sampled sites).
    """

    name: str
    shape: tuple[int, ...]
    event_dim: int
    plate_dims: dict[int, str]
    support: object = None

    @property
    def is_individual(self) -> bool:
        return VARIETY_PLATE in self.plate_dims.values()


@dataclass(frozen=True)
class ModelStructure:
    """A model's sites by role (see docs/model_convention.md)."""

    population: dict[str, SiteInfo] = field(default_factory=dict)
    individual: dict[str, SiteInfo] = field(default_factory=dict)
    observed: dict[str, SiteInfo] = field(default_factory=dict)
    deterministic: dict[str, SiteInfo] = field(default_factory=dict)

    @property
    def latent(self) -> dict[str, SiteInfo]:
        return {**self.population, **self.individual}


def _plate_dims(site: dict) -> dict[int, str]:
    return {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized}


def trace_model(model: Callable, data: NLMEData, **model_kwargs) -> poutine.Trace:
    """One trace of the model from its prior, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(data, **model_kwargs)


def trace_until(
    model: Callable, site: str, data: NLMEData, **model_kwargs
) -> tuple[poutine.Trace, dist.Distribution]:
    """Run ``model`` up to its sample site ``site`` and stop there (``poutine.escape``): the
    trace of the sites before it and the distribution of ``site``. The rest of the model (e.g.
    its likelihood) is not run.

    :raises ValueError: if the model has no sample site ``site``.
    """
    tracer = poutine.trace(poutine.escape(model, escape_fn=lambda msg: msg["name"] == site))
    try:
        tracer(data, **model_kwargs)
    except NonlocalExit as exit:
        return tracer.trace, exit.site["fn"]
    raise ValueError(f"the model has no sample site {site!r}")


def sites_moved_by(
    model: Callable,
    data: NLMEData,
    trace: poutine.Trace,
    changes: dict[str, torch.Tensor],
    model_kwargs: dict,
    rtol: float = 0.0,
) -> tuple[poutine.Trace, list[str]]:
    """Re-trace ``model`` with every latent site at its value in ``trace`` but ``changes``;
    return the new trace and the sample sites (observed ones included, changed ones not)
    whose log-density moved beyond ``rtol``: the sites that depend on the changed ones."""
    values = {
        name: node["value"]
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"]
    }
    conditioned = poutine.condition(model, data={**values, **changes})
    moved = poutine.trace(conditioned).get_trace(data, **model_kwargs)
    dependent = [
        name
        for name, node in trace.nodes.items()
        if node["type"] == "sample"
        and name not in changes
        and not torch.allclose(
            node["fn"].log_prob(node["value"]),
            moved.nodes[name]["fn"].log_prob(moved.nodes[name]["value"]),
            rtol=rtol,
            atol=0.0,
        )
    ]
    return moved, dependent


def model_structure(model: Callable, data: NLMEData, **model_kwargs) -> ModelStructure:
    """Classify a model's sites: population-level latents (outside the variety plate),
    individual-level latents (inside it), observed sites and deterministic sites.

    :raises ValueError: if the model breaks the convention (no ``obs`` site, or a latent site
        in the variety plate that is not at the plate's dim).
    """
    trace = trace_model(model, data, **model_kwargs)
    declared = model_event_dims(model)
    structure = ModelStructure()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn = site["fn"]
        deterministic = site["infer"].get("_deterministic", False)
        info = SiteInfo(
            name,
            tuple(site["value"].shape),
            # A deterministic site is a Delta whose event covers every dim: use the declared ones.
            len(declared.get(name, ())) if deterministic else fn.event_dim,
            _plate_dims(site),
            None if deterministic else fn.support,
        )
        if deterministic:
            structure.deterministic[name] = info
        elif site["is_observed"] or name == OBSERVED_SITE:
            structure.observed[name] = info
        elif info.is_individual:
            structure.individual[name] = info
        else:
            structure.population[name] = info
    if OBSERVED_SITE not in structure.observed:
        raise ValueError(
            f"model {getattr(model, '__name__', model)!r} has no observed site named "
            f"{OBSERVED_SITE!r} (see docs/model_convention.md)"
        )
    return structure


def iter_draws(samples: Mapping[str, torch.Tensor]) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(chain, draw, {site: value})`` from samples shaped ``[chain, draw, *shape]``."""
    first = next(iter(samples.values()))
    n_chains, n_draws = first.shape[:2]
    for chain in range(n_chains):
        for draw in range(n_draws):
            yield chain, draw, {name: value[chain, draw] for name, value in samples.items()}


@dataclass(frozen=True)
class Replay:
    """What replaying the model on posterior draws gives, each ``[chain, draw, *shape]``.

    :param log_likelihood: per observed cell of the grid ``[C, D, V, S, P, T]`` (0 where masked).
    :param predictive: observations simulated from each draw ``[C, D, V, S, P, T]``.
    :param deterministic: deterministic sites (e.g. ``curve``).
    """

    log_likelihood: torch.Tensor
    predictive: torch.Tensor
    deterministic: dict[str, torch.Tensor]


@torch.no_grad()
def replay(
    model: Callable,
    data: NLMEData,
    samples: Mapping[str, torch.Tensor],
    seed: int = 0,
    **model_kwargs,
) -> Replay:
    """Condition the model on each draw of its latent sites and read the trace.

    :param samples: every latent site, ``[chain, draw, *shape]``, for all varieties.
    :param seed: seeds the predictive simulation.
    """
    log_likelihood, predictive, deterministic = [], [], {}
    with pyro.validation_enabled(False), torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        for _chain, _draw, values in iter_draws(samples):
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                data, **model_kwargs
            )
            site = trace.nodes[OBSERVED_SITE]
            log_likelihood.append(site["fn"].log_prob(site["value"]))
            predictive.append(site["fn"].sample())
            for name, node in trace.nodes.items():
                if node["type"] == "sample" and node["infer"].get("_deterministic"):
                    deterministic.setdefault(name, []).append(node["value"])
    first = next(iter(samples.values()))
    shape = tuple(first.shape[:2])

    def stack(values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values)
        return stacked.reshape(shape + stacked.shape[1:])

    return Replay(
        log_likelihood=stack(log_likelihood),
        predictive=stack(predictive),
        deterministic={name: stack(values) for name, values in deterministic.items()},
    )


PER_UNIT_DIMS = ("marker", "variety", "kinship_component")
"""Dims of population-level sites that hold one value per marker or per variety."""


def summary_sites(model: Callable, structure: ModelStructure) -> list[str]:
    """Population-level sites for a printed summary: those without a per-marker or
    per-variety dim (marker effects and kinship-form genetic values are left out)."""
    declared = model_event_dims(model)
    return [
        name
        for name, info in structure.population.items()
        if not set(PER_UNIT_DIMS) & (set(info.plate_dims.values()) | set(declared.get(name, ())))
    ]
