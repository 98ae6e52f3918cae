"""The reference model of the target design (G2WAS): logistic growth of every plant, curve
parameters driven by markers, scenarios, variety x scenario interaction and plant effects.

For variety ``v``, scenario ``s``, plant ``p`` and curve parameter ``k`` in (log asymptote,
log rate, inflection)::

    phi[v, s, p, k] = scenario_mean[s, k] + genetic_value[v, k]
                      + variety_scenario_effect[v, s, k] + plant_effect[v, s, p, k]
    genetic_value[v] = Z[v] @ marker_effect            (Z: standardised dosages)
    marker_effect[m, k] ~ Normal(0, genetic_sd[k] / sqrt(M))     (marker_prior="ridge")
    variety_scenario_effect[v, s, k] ~ Normal(0, variety_scenario_sd[k])
    plant_effect[v, s, p, k] ~ Normal(0, plant_sd[k])
    curve[v, s, p, t] = exp(phi0) * sigmoid(exp(phi1) * (time - phi2))
    obs ~ LogNormal(log curve, noise_sd)        (or another observation model)

Without markers, ``genetic_value[v, k] ~ Normal(0, genetic_sd[k])`` (independent varieties).
With markers, ``marker_prior`` chooses the prior of the marker effects
(:mod:`pyro_nlme.model.marker_priors`: ridge, regularised horseshoe, spike-and-slab, each sparse
one optionally with its sparsity shared across the three curve parameters) or replaces the
linear genetic value by a network of the markers and the scenario
(:mod:`pyro_nlme.model.marker_network`); ``marker_gxe=True`` adds scenario-specific marker
effects (genotype x environment, docs/marker_priors.md).
With a single scenario and no markers the variety x scenario effect is omitted (it would be
confounded with the genetic value), and so is the plant effect with one plant per variety x
scenario. Latents of absent variety x scenario combinations and padded plant slots have no data
and are drawn from their prior (they are not masked: a masked latent would leave the guide's
entropy unbounded); ``constant_data.plant_mask`` in the export says which exist.
Population-level latents: ``scenario_mean``, ``genetic_sd``, ``variety_scenario_sd``,
``plant_sd``, ``marker_effect`` (``genetic_value_raw`` or ``genetic_value_component``, and the
deterministic ``genetic_value``, in the kinship form) and the noise; the rest is individual-level.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_nlme.data import NLMEData
from pyro_nlme.model import (
    CURVE_SITE,
    GrowthScale,
    nlme_model,
    observation_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.curves import log_logistic
from pyro_nlme.model.kinship import (
    KINSHIP_COMPONENT_DIM,
    KINSHIP_PARAMETRIZATIONS,
    kinship_genetic_values,
)
from pyro_nlme.model.marker_network import MARKER_NETWORK, marker_network
from pyro_nlme.model.marker_priors import marker_plate, sample_marker_effects, uses_genetic_sd
from pyro_nlme.model.observations import ObservationModel

CURVE_PARAMETERS = ("log_asymptote", "log_rate", "inflection")
MARKER_PRIORS = (
    "ridge",
    "horseshoe",
    "spike_slab",
    "horseshoe_shared",
    "spike_slab_shared",
    "neural",
)
"""Values of ``marker_prior``: a prior of the marker effects (``_shared``: one local scale or
indicator per marker for the three curve parameters), or ``neural``, a covariate network."""
PARAMETRIZATIONS = KINSHIP_PARAMETRIZATIONS
"""Values of ``parametrization``: ``noncentred`` or ``centred``."""


def _has_variety_scenario_effect(data: NLMEData) -> bool:
    return data.n_scenarios > 1 or data.markers is not None


def _random_level(
    level: str, parent: torch.Tensor, sd: torch.Tensor, parametrization: str
) -> torch.Tensor:
    """The curve parameters one level down, ``Normal(parent, sd)`` ``[..., K]``: sampled as
    ``{level}_parameter`` (centred) or as ``parent + {level}_effect`` with the effect
    ``Normal(0, sd)`` (non-centred). Call it inside the level's plates."""
    if parametrization == "centred":
        return pyro.sample(f"{level}_parameter", dist.Normal(parent, sd).to_event(1))
    effect = pyro.sample(f"{level}_effect", dist.Normal(torch.zeros_like(sd), sd).to_event(1))
    return parent + effect


@nlme_model(
    event_dims={
        "scenario_mean": ("scenario", "curve_parameter"),
        "genetic_sd": ("curve_parameter",),
        "variety_scenario_sd": ("curve_parameter",),
        "plant_sd": ("curve_parameter",),
        "marker_effect": ("curve_parameter",),
        "marker_effect_global_scale": ("curve_parameter",),
        "marker_effect_slab_variance": ("curve_parameter",),
        "marker_effect_local_scale": ("curve_parameter",),
        "marker_effect_inclusion": ("curve_parameter",),
        "marker_effect_inclusion_probability": ("curve_parameter",),
        "marker_effect_standardised": ("curve_parameter",),
        "marker_scenario_sd": ("curve_parameter",),
        "marker_scenario_effect": ("scenario", "curve_parameter"),
        f"{MARKER_NETWORK}_value": ("curve_parameter",),
        "genetic_value": ("variety", "curve_parameter"),
        "genetic_value_raw": (KINSHIP_COMPONENT_DIM, "curve_parameter"),
        "genetic_value_component": (KINSHIP_COMPONENT_DIM, "curve_parameter"),
        "variety_scenario_effect": ("curve_parameter",),
        "plant_effect": ("curve_parameter",),
        "variety_scenario_parameter": ("curve_parameter",),
        "plant_parameter": ("curve_parameter",),
    },
    coords={"curve_parameter": CURVE_PARAMETERS},
)
def g2was(
    data: NLMEData,
    subsample_size: int | None = None,
    likelihood: str | ObservationModel = "lognormal",
    marker_form: str = "effects",
    marker_prior: str = "ridge",
    marker_gxe: bool = False,
    parametrization: str = "noncentred",
) -> torch.Tensor:
    """:param data: the phenotypes (and genotypes, if any) of the full data set.
    :param subsample_size: varieties per minibatch (None: all).
    :param likelihood: observation model name or object (``lognormal``: multiplicative error).
    :param marker_form: with markers, ``"effects"`` samples the marker effects ``[M, K]``;
        ``"kinship"`` samples the genetic values ``[V, K]`` from their exact marginal
        ``Normal(0, genetic_sd ** 2 K)`` (GBLUP, :mod:`pyro_nlme.model.kinship`): the same
        distribution of the data, ``V`` instead of ``M`` latents per curve parameter. The
        genetic values are correlated across varieties, but their non-centred latents are
        population-level, so the variety plate can still be subsampled: given them, varieties
        are independent.
    :param marker_prior: with ``marker_form="effects"``, one of :data:`MARKER_PRIORS`:
        ``ridge`` (Gaussian, GBLUP), ``horseshoe`` (regularised, response scale the genetic-SD
        prior's scale, no ``genetic_sd`` site), ``spike_slab`` (with the deterministic
        ``marker_effect_inclusion_probability``, whose posterior mean is the PIP), their
        ``_shared`` variants, or ``neural``: the genetic term is
        ``marker_network_value[v, s, k]``, a network of the markers and the scenario with
        point-estimate weights (SVI only; no ``genetic_sd`` site).
    :param marker_gxe: add scenario-specific marker effects, ``Z[v] @
        marker_scenario_effect[:, s, k]`` with ``marker_scenario_effect[m, s, k] ~ Normal(0,
        marker_scenario_sd[k] / sqrt(M))`` (a ridge, whatever ``marker_prior``), to the genetic
        value of scenario ``s``. Not with ``neural``, which takes the scenario as an input.
    :param parametrization: ``"noncentred"`` samples the effects ``variety_scenario_effect``
        and ``plant_effect`` (mean 0) and, in the kinship form, ``genetic_value_raw``;
        ``"centred"`` samples the parameters ``variety_scenario_parameter ~ Normal(
        scenario_mean + genetic_value, variety_scenario_sd)`` and ``plant_parameter ~
        Normal(variety_scenario_parameter, plant_sd)`` and, in the kinship form, the genetic
        values' eigen-components ``genetic_value_component``
        (:func:`pyro_nlme.model.kinship.kinship_genetic_values`). The same model; the centred
        form suits levels the data determine well (each plant's curve is seen on every day), the
        non-centred one weakly informed levels and NUTS.
    :returns: the observations ``[B, S, P, T]`` (sampled when ``data.values`` is None).
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
        )
    if marker_form not in ("effects", "kinship"):
        raise ValueError(f"marker_form must be 'effects' or 'kinship', got {marker_form!r}")
    if marker_prior not in MARKER_PRIORS:
        raise ValueError(f"marker_prior must be one of {MARKER_PRIORS}, got {marker_prior!r}")
    prior, shared = marker_prior.removesuffix("_shared"), marker_prior.endswith("_shared")
    if marker_form == "kinship" and (prior != "ridge" or marker_gxe):
        raise ValueError("marker_form='kinship' is the ridge prior's marginal, without G x E")
    if prior == "neural" and marker_gxe:
        raise ValueError("marker_prior='neural' takes the scenario as input: no marker_gxe")
    kinship = data.markers is not None and marker_form == "kinship"
    markers = data.markers is not None and not kinship
    neural = markers and prior == "neural"
    scale = GrowthScale.of(data)
    centre, spread = scale.logistic_centre, scale.logistic_spread
    n_scenarios = data.n_scenarios
    scenario_mean = pyro.sample(
        "scenario_mean",
        dist.Normal(centre.expand(n_scenarios, 3), spread.expand(n_scenarios, 3)).to_event(2),
    )
    if not markers or (not neural and uses_genetic_sd(prior)):
        genetic_sd = pyro.sample("genetic_sd", dist.HalfNormal(spread / 2).to_event(1))
    with_interaction = _has_variety_scenario_effect(data)
    if with_interaction:
        variety_scenario_sd = pyro.sample(
            "variety_scenario_sd", dist.HalfNormal(spread / 2).to_event(1)
        )
    if data.n_plants > 1:
        plant_sd = pyro.sample("plant_sd", dist.HalfNormal(spread / 4).to_event(1))
    noise = observation_model(likelihood).sample_noise()
    if kinship:
        genetic_values = kinship_genetic_values(
            data.markers, genetic_sd, parametrization=parametrization
        )
    elif neural:
        network = marker_network(data.n_markers, n_scenarios, spread / 2)
    elif markers:
        markers_plate = marker_plate(data.n_markers)
        marker_effect = sample_marker_effects(
            prior,
            data.n_markers,
            data.summary.n_varieties_phenotyped,
            genetic_sd if uses_genetic_sd(prior) else None,
            spread / 2,
            shared=shared,
            plate=markers_plate,
        )
        if marker_gxe:
            scenario_effect = marker_scenario_effects(data, spread / 2, markers_plate)
            marker_effect = torch.cat([marker_effect, scenario_effect.flatten(1)], -1)

    with variety_plate(data, subsample_size) as idx:
        batch = data.subset(idx)
        scenarios = scenario_plate(data)
        if kinship:
            genetic = genetic_values[idx][:, None, None, None, :]
        elif neural:
            with scenarios:
                genetic = pyro.deterministic(
                    f"{MARKER_NETWORK}_value",
                    network(batch.markers)[:, :, None, None, :],
                    event_dim=1,
                )
        elif markers:
            # one pass over the int8 rows for main (and scenario-specific) effects
            values = batch.markers.standardized_matmul(marker_effect)
            genetic = values[:, None, None, None, :3]
            if marker_gxe:
                genetic = genetic + values[:, 3:].reshape(-1, n_scenarios, 1, 1, 3)
        else:
            genetic = pyro.sample(
                "genetic_value", dist.Normal(torch.zeros_like(genetic_sd), genetic_sd).to_event(1)
            )
        phi = scenario_mean[:, None, None, :] + genetic
        with scenarios:
            if with_interaction:
                phi = _random_level("variety_scenario", phi, variety_scenario_sd, parametrization)
            with plant_plate(data):
                if data.n_plants > 1:
                    phi = _random_level("plant", phi, plant_sd, parametrization)
                with time_plate(data):
                    log_curve = log_logistic(
                        batch.times, phi[..., 0], phi[..., 1].exp(), phi[..., 2]
                    )
                    curve = pyro.deterministic(CURVE_SITE, log_curve.exp())
                    distribution = observation_model(likelihood).distribution(
                        curve, noise, log_prediction=log_curve
                    )
                    return observe(batch, distribution)


def marker_scenario_effects(data: NLMEData, scale: torch.Tensor, plate: pyro.plate) -> torch.Tensor:
    """Scenario-specific marker effects ``[M, S, K]``, a ridge with its own SD
    ``marker_scenario_sd [K] ~ HalfNormal(scale)``, in the model's ``marker`` plate."""
    sd = pyro.sample("marker_scenario_sd", dist.HalfNormal(scale).to_event(1))
    effect_sd = (sd / data.n_markers**0.5).expand(data.n_scenarios, sd.shape[-1])
    with plate:
        return pyro.sample(
            "marker_scenario_effect",
            dist.Normal(torch.zeros_like(effect_sd), effect_sd).to_event(2),
        )
