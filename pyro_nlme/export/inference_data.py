"""One ArviZ exporter for every engine: draws of a model's latent sites in, InferenceData out,
with the same variable names and dims whichever engine produced the draws.

Groups: ``posterior`` (latent and deterministic sites; dims named after the plates and the
model's declared event dims, labels from the data), ``posterior_predictive`` and
``log_likelihood`` (site ``obs``, one entry per observed value along dim ``observation``, so
``az.loo`` works), ``observed_data``, ``constant_data`` (times and labels of each observation,
the full time grid and masks), ``sample_stats`` when the engine has some, any extra groups an
engine adds (e.g. SAEM's point estimates), and attrs (engine, settings, seed, model, versions).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import arviz as az
import numpy as np
import torch
import xarray as xr

from pyro_nlme.data import NLMEData
from pyro_nlme.infer.util import ModelStructure, SiteInfo, model_structure, replay
from pyro_nlme.model.convention import OBSERVED_SITE, model_coords, model_event_dims

OBSERVATION_DIM = "observation"
GUIDE_MEAN = "guide_mean"
"""Group of closed-form posterior means of some sites, ``[*site dims]`` without chain and draw
(SVI: marker effects fitted by a joint Gaussian coordinate-ascent factor, whose draws are too
spread for a mean over draws)."""
PACKAGES = ("pyro_nlme", "pyro-ppl", "torch", "arviz", "xarray", "numpy", "pandas")


def package_versions() -> dict[str, str]:
    """Versions of the packages that made a result (and Python's)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_coords(data: NLMEData) -> dict[str, list]:
    """Labels of the plate dims, taken from the data."""
    coords = {
        "variety": list(data.variety_ids),
        "scenario": list(data.scenario_names),
        "plant": list(range(1, data.n_plants + 1)),
        "time": list(range(data.n_times)),
    }
    if data.markers is not None:
        coords["marker"] = list(data.markers.marker_ids)
    return coords


def site_dims(info: SiteInfo, event_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Dim names of a site's value, and the positions of size-1 batch dims to squeeze.

    Batch dims take their plate's name; size-1 batch dims outside any plate are squeezed; event
    dims take the model's declared names, else ``{site}_dim_{i}``.
    """
    batch_ndim = len(info.shape) - info.event_dim
    names, squeeze = [], []
    for position in range(batch_ndim):
        dim = position - batch_ndim
        if dim in info.plate_dims:
            names.append(info.plate_dims[dim])
        elif info.shape[position] == 1:
            squeeze.append(position)
        else:
            names.append(f"{info.name}_dim_{position}")
    if info.event_dim:
        declared = event_names[-info.event_dim :] if event_names else ()
        names += list(declared) or [f"{info.name}_event_{i}" for i in range(info.event_dim)]
    return names, squeeze


def _dataset(
    arrays: Mapping[str, np.ndarray],
    structure_sites: Mapping[str, SiteInfo],
    event_dims: Mapping[str, tuple[str, ...]],
    coords: Mapping[str, list],
    leading: tuple[str, ...] = ("chain", "draw"),
) -> xr.Dataset:
    variables = {}
    for name, array in arrays.items():
        dims, squeeze = site_dims(structure_sites[name], event_dims.get(name, ()))
        array = np.squeeze(array, axis=tuple(len(leading) + p for p in squeeze))
        variables[name] = xr.DataArray(array, dims=list(leading) + dims)
    used = {d for v in variables.values() for d in v.dims}
    dataset = xr.Dataset(variables)
    for dim, labels in coords.items():
        if dim in used and dataset.sizes[dim] == len(labels):
            dataset = dataset.assign_coords({dim: labels})
    for dim in ("chain", "draw"):
        if dim in used:
            dataset = dataset.assign_coords({dim: np.arange(dataset.sizes[dim])})
    return dataset


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def observation_index(data: NLMEData) -> tuple[torch.Tensor, ...]:
    """Grid positions of the observed values, in C order: the ``observation`` dim."""
    return data.mask.nonzero(as_tuple=True)


def to_inference_data(
    model: Callable,
    data: NLMEData,
    samples: Mapping[str, torch.Tensor],
    *,
    engine: str,
    settings: Mapping[str, object],
    seed: int,
    model_name: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    sample_stats: Mapping[str, np.ndarray] | None = None,
    extra_groups: Mapping[str, xr.Dataset] | None = None,
    structure: ModelStructure | None = None,
) -> az.InferenceData:
    """Build the InferenceData of a fit (or of a prediction: with ``data.values`` None the
    ``observation`` dim covers every cell of ``data.mask`` and there is no ``log_likelihood``
    nor ``observed_data``).

    :param samples: draws of every latent site ``[chain, draw, *site shape]`` (all varieties);
        deterministic sites may be included, otherwise they are recomputed by replaying.
    :param engine: ``"svi"``, ``"nuts"``, ``"saem"``, ...
    :param settings: the engine's settings (JSON-serialisable), stored in attrs.
    :param seed: the seed of the fit; also seeds the predictive simulation.
    :param model_name: how the model was given (built-in name or ``path.py:function``).
    :param model_kwargs: keyword arguments the model was called with.
    :param sample_stats: per-draw engine statistics ``[chain, draw]`` (e.g. ``diverging``).
    :param extra_groups: further groups (e.g. ``point_estimate``) added as they are.
    """
    model_kwargs = dict(model_kwargs or {})
    structure = structure or model_structure(model, data, **model_kwargs)
    event_dims = model_event_dims(model)
    coords = {**data_coords(data), **model_coords(model, data)}
    latent = {name: samples[name] for name in structure.latent if name in samples}
    missing = sorted(set(structure.latent) - set(latent))
    if missing:
        raise ValueError(f"samples lack latent site(s) {missing}")
    replayed = replay(model, data, latent, seed=seed, **model_kwargs)
    posterior_arrays = {name: _numpy(value) for name, value in latent.items()}
    posterior_arrays.update({k: _numpy(v) for k, v in replayed.deterministic.items()})
    sites = {**structure.latent, **structure.deterministic}
    posterior = _dataset(posterior_arrays, sites, event_dims, coords)

    index = observation_index(data)
    observation_coords = {OBSERVATION_DIM: np.arange(int(data.mask.sum()))}

    def per_observation(grid: torch.Tensor) -> np.ndarray:
        return _numpy(grid[(...,) + index])

    def observation_dataset(array: np.ndarray, leading: tuple[str, ...]) -> xr.Dataset:
        dataset = xr.Dataset({OBSERVED_SITE: (leading + (OBSERVATION_DIM,), array)})
        dataset = dataset.assign_coords(observation_coords)
        for dim in leading:
            dataset = dataset.assign_coords({dim: np.arange(dataset.sizes[dim])})
        return dataset

    groups = {
        "posterior": posterior,
        "posterior_predictive": observation_dataset(
            per_observation(replayed.predictive), ("chain", "draw")
        ),
    }
    if data.values is not None:
        groups["log_likelihood"] = observation_dataset(
            per_observation(replayed.log_likelihood), ("chain", "draw")
        )
        groups["observed_data"] = observation_dataset(per_observation(data.values), ())
    groups["constant_data"] = _constant_data(data, index, coords)
    if sample_stats:
        groups["sample_stats"] = xr.Dataset(
            {k: (("chain", "draw"), np.asarray(v)) for k, v in sample_stats.items()}
        ).assign_coords(posterior[["chain", "draw"]].coords)
    idata = az.InferenceData(**groups)
    if extra_groups:
        idata.add_groups(dict(extra_groups))
    attrs = {
        "engine": engine,
        "settings": json.dumps(dict(settings), default=str, sort_keys=True),
        "seed": int(seed),
        "model": model_name or getattr(model, "__name__", str(model)),
        "model_kwargs": json.dumps(model_kwargs, default=str, sort_keys=True),
        "versions": json.dumps(package_versions(), sort_keys=True),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "inference_library": "pyro_nlme",
        "data_summary": json.dumps(data.summary.as_dict(), sort_keys=True),
    }
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata


def _constant_data(data: NLMEData, index: tuple[torch.Tensor, ...], coords: dict) -> xr.Dataset:
    v, s, p, t = (_numpy(i) for i in index)
    grid_dims = ("variety", "scenario", "plant", "time")
    dataset = xr.Dataset(
        {
            "obs_variety": (OBSERVATION_DIM, np.asarray(data.variety_ids, dtype=str)[v]),
            "obs_scenario": (OBSERVATION_DIM, np.asarray(data.scenario_names, dtype=str)[s]),
            "obs_plant": (OBSERVATION_DIM, data.plant_ids[v, s, p].astype(str)),
            "obs_time": (OBSERVATION_DIM, _numpy(data.times[v, s, p, t])),
            "obs_grid_index": ((OBSERVATION_DIM, "grid_axis"), np.stack([v, s, p, t], axis=1)),
            "times": (grid_dims, _numpy(data.times)),
            "mask": (grid_dims, _numpy(data.mask)),
            "plant_mask": (grid_dims[:3], _numpy(data.plant_mask)),
            "plant_id": (grid_dims[:3], data.plant_ids.astype(str)),
        }
    )
    dataset = dataset.assign_coords({d: coords[d] for d in grid_dims})
    dataset = dataset.assign_coords(
        {OBSERVATION_DIM: np.arange(len(v)), "grid_axis": list(grid_dims)}
    )
    if data.markers is not None:
        markers = data.markers
        dataset["marker_mean"] = ("marker", _numpy(markers.mean))
        dataset["marker_scale"] = ("marker", _numpy(markers.scale))
        dataset["marker_monomorphic"] = ("marker", _numpy(markers.monomorphic))
        dataset = dataset.assign_coords(marker=list(markers.marker_ids))
    if data.covariate_names:
        dataset["covariate_design"] = (
            ("variety", "covariate"),
            _numpy(data.covariate_design),
        )
        dataset = dataset.assign_coords(covariate=list(data.covariate_names))
    return dataset
