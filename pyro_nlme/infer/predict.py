"""Genomic prediction: whole growth curves of varieties never phenotyped, from their markers.

The markers enter the model (marker effects), so the prediction for a new variety is the
model's own conditional distribution given the population-level posterior: for each posterior
draw of the population-level latents, the new variety's individual-level latents are drawn
from the model (given its markers, standardised with the training moments), then its curves
and observations. Exact under the model; no guide is involved.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from pyro_nlme.data import DataError, DataSummary, GenotypeMatrix, NLMEData, read_genotypes
from pyro_nlme.data.tables import TableSource
from pyro_nlme.export import to_inference_data
from pyro_nlme.infer.util import model_structure
from pyro_nlme.model.registry import resolve_model


def _training_markers(
    idata: az.InferenceData, source: TableSource
) -> tuple[list[str], GenotypeMatrix]:
    """Read new genotypes, check they have the training markers, standardise like training."""
    constant = idata.constant_data
    if "marker_mean" not in constant:
        raise ValueError("this fit has no markers: genomic prediction needs a marker model")
    variety_ids, new = read_genotypes(source)
    trained = [str(m) for m in constant["marker"].values]
    if new.marker_ids != trained:
        missing = sorted(set(trained) - set(new.marker_ids))
        extra = sorted(set(new.marker_ids) - set(trained))
        raise DataError(
            f"genotype table {str(source)!r} does not have the fit's markers in the fit's order: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unknown (e.g. {extra[:5]})"
        )
    markers = GenotypeMatrix(
        dosages=new.dosages,
        marker_ids=trained,
        mean=torch.as_tensor(constant["marker_mean"].values),
        scale=torch.as_tensor(constant["marker_scale"].values),
        monomorphic=torch.as_tensor(constant["marker_monomorphic"].values),
        n_imputed=new.n_imputed,
    )
    return variety_ids, markers


def prediction_design(
    idata: az.InferenceData, variety_ids: list[str], markers: GenotypeMatrix
) -> NLMEData:
    """New varieties on the fit's design: its scenarios, plants per scenario and the times of
    its most completely observed plant, every cell to be predicted (``values`` None)."""
    constant = idata.constant_data
    times = constant["times"].values
    mask = constant["mask"].values
    counts = mask.reshape(-1, mask.shape[-1]).sum(-1)
    reference = times.reshape(-1, times.shape[-1])[int(np.argmax(counts))]
    n_scenarios, n_plants = times.shape[1], times.shape[2]
    n_new = len(variety_ids)
    grid = (n_new, n_scenarios, n_plants, times.shape[-1])
    summary = DataSummary(**json.loads(idata.posterior.attrs["data_summary"]))
    plant_ids = np.array(
        [
            [[f"{v}|{s}|{p + 1}" for p in range(n_plants)] for s in constant["scenario"].values]
            for v in variety_ids
        ],
        dtype=object,
    )
    return NLMEData(
        times=torch.as_tensor(reference, dtype=torch.float32).expand(grid).clone(),
        values=None,
        mask=torch.ones(grid, dtype=torch.bool),
        plant_mask=torch.ones(grid[:3], dtype=torch.bool),
        variety_index=torch.arange(n_new),
        variety_ids=list(variety_ids),
        scenario_names=[str(s) for s in constant["scenario"].values],
        plant_ids=plant_ids,
        markers=markers,
        covariate_design=torch.zeros(n_new, 0),
        covariate_names=[],
        summary=summary,
    )


@torch.no_grad()
def predict_new_varieties(
    idata: az.InferenceData, markers: TableSource, seed: int = 0
) -> az.InferenceData:
    """Posterior predictive curves of new varieties from their markers.

    :param idata: a fit (any engine) of a marker model, as written by ``pyro-nlme fit``.
    :param markers: genotype table of the new varieties (the fit's markers, same order).
    :returns: InferenceData whose ``posterior`` holds the new varieties' individual latents and
        ``curve`` (noise-free) and ``posterior_predictive`` their observations on the fit's design.
    """
    attrs = idata.posterior.attrs
    model, model_name = resolve_model(attrs["model"])
    model_kwargs = json.loads(attrs["model_kwargs"])
    if model_kwargs.get("marker_form") == "kinship":
        # The fit carries back-solved marker effects (kinship.attach_marker_effects): new
        # varieties are predicted through the equivalent effects form.
        model_kwargs["marker_form"] = "effects"
    variety_ids, genotypes = _training_markers(idata, markers)
    data = prediction_design(idata, variety_ids, genotypes)
    structure = model_structure(model, data, **model_kwargs)
    population = {
        name: torch.as_tensor(idata.posterior[name].values) for name in structure.population
    }
    n_chains, n_draws = next(iter(population.values())).shape[:2]
    individual: dict[str, list] = {name: [] for name in structure.individual}
    pyro.set_rng_seed(seed)
    for chain in range(n_chains):
        for draw in range(n_draws):
            values = {
                name: value[chain, draw].reshape(structure.population[name].shape)
                for name, value in population.items()
            }
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                data, **model_kwargs
            )
            for name in individual:
                individual[name].append(trace.nodes[name]["value"])
    samples = {
        name: value.reshape(n_chains, n_draws, *structure.population[name].shape)
        for name, value in population.items()
    }
    for name, values in individual.items():
        samples[name] = torch.stack(values).reshape(n_chains, n_draws, *values[0].shape)
    return to_inference_data(
        model,
        data,
        samples,
        engine=f"predict[{attrs['engine']}]",
        settings={"fit_created_at": attrs.get("created_at"), "seed": seed},
        seed=seed,
        model_name=model_name,
        model_kwargs=model_kwargs,
        structure=structure,
    )
