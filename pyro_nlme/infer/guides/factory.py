"""Building a guide for a model by name: ``normal``, ``lowrank`` or ``amortized``.

Every guide opens the ``variety`` plate exactly as the model does (same size, dim and
``subsample_size`` read from the call), so under subsampling the guide draws the minibatch
indices and SVI replays them into the model. AutoContinuous guides are silently wrong on
subsampled local latents (PYRO_NOTES), so the low-rank family covers population-level sites
only.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
from pyro.infer.autoguide import (
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.guides.amortized import AmortizedGuide
from pyro_nlme.infer.guides.init import init_to_prior_median
from pyro_nlme.infer.guides.marker_cavi import CoordinateAscentGuide
from pyro_nlme.infer.util import ModelStructure
from pyro_nlme.model.convention import VARIETY_DIM, VARIETY_PLATE
from pyro_nlme.model.priors import MARKER_PLATE

GUIDES = ("amortized", "normal", "lowrank")


def create_variety_plate(data: NLMEData, subsample_size: int | None = None, **_) -> pyro.plate:
    """The model's variety plate, for AutoGuides' ``create_plates`` (same call signature)."""
    return pyro.plate(
        VARIETY_PLATE, data.n_varieties, subsample_size=subsample_size, dim=VARIETY_DIM
    )


def low_rank_sites(structure: ModelStructure) -> list[str]:
    """Population sites that go in the low-rank MVN: all but per-marker effects (those are
    mean-field: a 60,000 x K block is too wide for a useful low-rank factor)."""
    return [
        name
        for name, info in structure.population.items()
        if MARKER_PLATE not in info.plate_dims.values()
    ]


def build_guide(
    kind: str,
    model: Callable,
    data: NLMEData,
    structure: ModelStructure,
    rank: int | None = None,
    init_scale: float = 0.05,
    init_values: dict | None = None,
    cavi_response_site: str | None = None,
    model_kwargs: dict | None = None,
    **amortized_options,
) -> Callable:
    """A guide for ``model``.

    :param kind: ``normal`` (mean-field over every latent), ``lowrank`` (low-rank MVN over the
        population-level sites, mean-field elsewhere) or ``amortized`` (mean-field over the
        population-level sites, an encoder network for the individual-level ones).
    :param rank: rank of the low-rank MVN (default: about the square root of its dimension).
    :param init_scale: initial SD of the mean-field factors, unconstrained scale.
    :param init_values: initial locations of some latent sites (e.g. the pooled estimates of
        :func:`~pyro_nlme.infer.guides.pooled.pooled_estimates`); the others start at their
        (conditional) prior medians.
    :param cavi_response_site: with ``normal``, fit the model's spike-and-slab marker effects
        by coordinate ascent given this centred site (:class:`CoordinateAscentGuide`).
    :param model_kwargs: the model's keyword arguments (needed with ``cavi_response_site``).
    :param amortized_options: passed to :class:`AmortizedGuide`.
    """
    init_loc_fn = init_to_value(values=init_values or {}, fallback=init_to_prior_median)
    if kind == "normal" and cavi_response_site is not None:
        return CoordinateAscentGuide(
            model,
            data,
            cavi_response_site,
            model_kwargs or {},
            create_plates=create_variety_plate,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
        )
    if kind == "normal":
        return AutoNormal(
            model,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            create_plates=create_variety_plate,
        )
    if kind == "lowrank":
        joint = low_rank_sites(structure)
        guide = AutoGuideList(model, create_plates=create_variety_plate)
        guide.append(
            AutoLowRankMultivariateNormal(
                poutine.block(model, expose=joint),
                init_loc_fn=init_loc_fn,
                init_scale=init_scale,
                rank=rank,
            )
        )
        guide.append(
            AutoNormal(
                poutine.block(model, hide=joint),
                init_loc_fn=init_loc_fn,
                init_scale=init_scale,
            )
        )
        return guide
    if kind == "amortized":
        return AmortizedGuide(
            model,
            data,
            structure,
            init_scale=init_scale,
            init_loc_fn=init_loc_fn,
            model_kwargs=model_kwargs,
            **amortized_options,
        )
    raise ValueError(f"unknown guide {kind!r}; choose one of {GUIDES}")
