"""The model convention every engine (SVI, NUTS, SAEM) relies on; docs/model_convention.md
explains it with examples.

- A model is a plain Python function ``model(data, subsample_size=None, **options)`` taking an
  :class:`~pyro_nlme.data.NLMEData`.
- Plates: ``variety`` (dim -4, the only one that may be subsampled), ``scenario`` (dim -3),
  ``plant`` (dim -2), ``time`` (dim -1), opened with the helpers below so sizes and dims agree.
- Population-level latents are the sample sites outside the ``variety`` plate; individual-level
  latents are the sites inside it. Every site inside the ``variety`` plate is conditionally
  independent across varieties given the population-level latents.
- The observed site is named ``obs``, sits inside all four plates, is masked by ``data.mask`` and
  samples when ``data.values`` is None (prior and posterior predictive).
- Optional deterministic site ``curve``: the noise-free prediction ``[V, S, P, T]``.
- Names of event dimensions (e.g. a vector of curve parameters) and their labels are declared
  with :func:`nlme_model`; the exporter reads batch dimension names off the plates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_nlme.data import DataError, NLMEData
from pyro_nlme.model.censoring import Censored

VARIETY_PLATE, SCENARIO_PLATE, PLANT_PLATE, TIME_PLATE = "variety", "scenario", "plant", "time"
VARIETY_DIM, SCENARIO_DIM, PLANT_DIM, TIME_DIM = -4, -3, -2, -1
OBSERVED_SITE = "obs"
CURVE_SITE = "curve"
MISSING_FILL = 1.0
"""Value put at masked cells before scoring: inside the support of every observation model."""


def variety_plate(data: NLMEData, subsample_size: int | None = None) -> pyro.plate:
    """The plate of varieties (dim -4); with ``subsample_size`` every site inside it is scaled
    by ``n_varieties / subsample_size``. Yields the indices of the varieties in the batch."""
    return pyro.plate(
        VARIETY_PLATE, data.n_varieties, subsample_size=subsample_size, dim=VARIETY_DIM
    )


def scenario_plate(data: NLMEData) -> pyro.plate:
    return pyro.plate(SCENARIO_PLATE, data.n_scenarios, dim=SCENARIO_DIM)


def plant_plate(data: NLMEData) -> pyro.plate:
    return pyro.plate(PLANT_PLATE, data.n_plants, dim=PLANT_DIM)


def time_plate(data: NLMEData) -> pyro.plate:
    return pyro.plate(TIME_PLATE, data.n_times, dim=TIME_DIM)


def observe(batch: NLMEData, distribution: dist.Distribution) -> torch.Tensor:
    """The observed site ``obs`` for a batch of varieties: scored where ``batch.mask`` is True,
    sampled everywhere when ``batch.values`` is None. Call it inside the four plates.

    What the data carry is applied here, so every model gets it for free: a binomial
    distribution takes its number of trials from ``batch.trials``, and where ``batch.censoring``
    marks censored values a continuous distribution is wrapped in
    :class:`~pyro_nlme.model.censoring.Censored` (a censored value scores the probability of its
    interval).

    :raises DataError: if an observed value is outside the distribution's support (e.g. a
        count that is not a non-negative integer), naming the variety, scenario, plant and time.
    :raises ValueError: if the data have a ``trials`` column but the distribution is not
        binomial, or censored values but no CDF.
    """
    distribution = _with_trials(batch, distribution)
    if batch.censoring is not None and batch.censoring.censored.any():
        censoring = batch.censoring
        distribution = Censored(
            distribution,
            censoring.code,
            censoring.lower.to(batch.times.dtype),
            censoring.upper.to(batch.times.dtype),
        )
    if batch.values is None:
        return pyro.sample(OBSERVED_SITE, distribution.mask(batch.mask))
    values = torch.where(batch.mask, batch.values, torch.full_like(batch.values, MISSING_FILL))
    _check_support(batch, distribution, values)
    return pyro.sample(OBSERVED_SITE, distribution.mask(batch.mask), obs=values)


def _with_trials(batch: NLMEData, distribution: dist.Distribution) -> dist.Distribution:
    if batch.trials is None:
        return distribution
    if not isinstance(distribution, dist.Binomial):
        raise ValueError(
            f"the data have a 'trials' column, which only the binomial observation model uses, "
            f"but the model's distribution is {type(distribution).__name__}"
        )
    trials = batch.trials.to(distribution.logits)
    return dist.Binomial(total_count=trials, logits=distribution.logits)


def _check_support(batch: NLMEData, distribution: dist.Distribution, values: torch.Tensor) -> None:
    inside = distribution.support.check(values)
    if inside.shape != values.shape:  # a support with event dims checks whole events
        return
    outside = batch.mask & ~inside
    if not outside.any():
        return
    cells = outside.nonzero().tolist()
    shown = ", ".join(
        f"variety {batch.variety_ids[v]!r}, scenario {batch.scenario_names[s]!r}, plant "
        f"{batch.plant_ids[v, s, p]!r}, time {float(batch.times[v, s, p, t]):g}: "
        f"{float(batch.values[v, s, p, t]):g}"
        for v, s, p, t in cells[:10]
    )
    more = f" and {len(cells) - 10} more" if len(cells) > 10 else ""
    if isinstance(distribution, dist.Binomial) and batch.trials is None:
        more += " (a binomial takes its numbers of trials from a 'trials' column)"
    raise DataError(
        f"{batch.summary.source}, column 'value': {len(cells)} value(s) outside the support of "
        f"the observation model ({type(distribution).__name__}: {distribution.support}) at "
        f"{shown}{more}"
    )


def nlme_model(
    event_dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[str]] | Callable[[NLMEData], Mapping] | None = None,
) -> Callable[[Callable], Callable]:
    """Declare the names of a model's event dimensions and their labels; the function itself is
    returned unchanged (with two attributes).

    :param event_dims: site name -> names of its rightmost (event) dimensions, e.g.
        ``{"scenario_mean": ("scenario", "curve_parameter")}``.
    :param coords: dimension name -> labels, or a function of the data returning that mapping
        (for labels that depend on the data, e.g. covariate names).
    """

    def declare(model: Callable) -> Callable:
        model.event_dims = dict(event_dims or {})
        model.coords = coords if coords is not None else {}
        return model

    return declare


def model_event_dims(model: Callable) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in getattr(model, "event_dims", {}).items()}


def model_coords(model: Callable, data: NLMEData) -> dict[str, list]:
    coords = getattr(model, "coords", {})
    return {k: list(v) for k, v in (coords(data) if callable(coords) else coords).items()}
