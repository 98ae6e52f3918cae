"""The data object every model and engine consumes: phenotypes on a dense, masked grid, aligned
with the genotypes and per-variety covariates by variety id."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pyro_nlme.data.censoring import Censoring
from pyro_nlme.data.errors import DataError
from pyro_nlme.data.genotypes import GenotypeMatrix, read_genotypes
from pyro_nlme.data.summary import DataSummary
from pyro_nlme.data.tables import Table, TableSource, parse_column_map, read_table, rename_columns
from pyro_nlme.data.validation import (
    censoring_columns,
    check_covariates_constant,
    check_no_duplicate_measurements,
    check_plants_nested,
    check_required_columns,
    numeric_column,
    text_column,
    trials_column,
)

DEFAULT_SCENARIO = "all"
"""Scenario label used when the phenotype table has no ``scenario`` column."""


@dataclass(frozen=True)
class NLMEData:
    """Phenotypes on a dense grid ``[variety, scenario, plant, time]`` with masks.

    Axis ``plant`` indexes the replicate plants of a variety x scenario (slot 0, 1, ...), axis
    ``time`` the successive measurements of a plant (slot 0, 1, ..., sorted by time), so ragged
    designs are padded and masked. Varieties with genotypes but no phenotypes are kept (all
    masked): they are what genomic prediction is for.

    :param times: float32 ``[V, S, P, T]``, measurement times (0 in padding), in the unit of the
        input (days for the target design).
    :param values: float32 ``[V, S, P, T]`` observed trait values (0 where masked), or None for
        prior predictive simulation.
    :param mask: bool ``[V, S, P, T]``, True where a value was observed.
    :param plant_mask: bool ``[V, S, P]``, True where the plant exists.
    :param variety_index: int64 ``[V]``, position of each variety in the full data set (a
        subset keeps the positions of its varieties).
    :param variety_ids: variety labels, length ``V``.
    :param scenario_names: scenario labels, length ``S``.
    :param plant_ids: object array ``[V, S, P]`` of plant labels (``""`` where absent).
    :param markers: genotypes aligned with ``variety_ids``, or None.
    :param covariate_design: float32 ``[V, D]`` per-variety covariates (categorical ones
        treatment-coded against their first level), or ``[V, 0]``.
    :param covariate_names: column names of ``covariate_design``.
    :param summary: counts of what was read, masked and kept.
    :param censoring: detection limits of censored values (from the ``cens`` and ``limit``
        columns), or None when nothing is censored. A censored cell is observed (mask True) and
        its value is the recorded bound.
    :param trials: int64 ``[V, S, P, T]`` number of trials of binomial observations (from the
        ``trials`` column; 1 in padding), or None.
    """

    times: torch.Tensor
    values: torch.Tensor | None
    mask: torch.Tensor
    plant_mask: torch.Tensor
    variety_index: torch.Tensor
    variety_ids: list[str]
    scenario_names: list[str]
    plant_ids: np.ndarray
    markers: GenotypeMatrix | None
    covariate_design: torch.Tensor
    covariate_names: list[str]
    summary: DataSummary
    censoring: Censoring | None = None
    trials: torch.Tensor | None = None

    @property
    def n_varieties(self) -> int:
        return self.times.shape[0]

    @property
    def n_scenarios(self) -> int:
        return self.times.shape[1]

    @property
    def n_plants(self) -> int:
        return self.times.shape[2]

    @property
    def n_times(self) -> int:
        return self.times.shape[3]

    @property
    def n_markers(self) -> int:
        return 0 if self.markers is None else self.markers.n_markers

    @property
    def device(self) -> torch.device:
        return self.times.device

    @property
    def phenotyped(self) -> torch.Tensor:
        """bool ``[V]``: varieties with at least one observed value."""
        return self.mask.flatten(1).any(1)

    @property
    def variety_scenario_mask(self) -> torch.Tensor:
        """bool ``[V, S]``: variety x scenario combinations with at least one plant."""
        return self.plant_mask.any(-1)

    def subset(self, rows: torch.Tensor | Sequence[int]) -> NLMEData:
        """The varieties at positions ``rows`` (e.g. a minibatch from a subsampled plate)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        cpu_rows = rows.cpu().numpy()
        return dataclasses.replace(
            self,
            times=self.times[rows],
            values=None if self.values is None else self.values[rows],
            mask=self.mask[rows],
            plant_mask=self.plant_mask[rows],
            variety_index=self.variety_index[rows],
            variety_ids=[self.variety_ids[i] for i in cpu_rows],
            plant_ids=self.plant_ids[cpu_rows],
            markers=None if self.markers is None else self.markers.take(rows),
            covariate_design=self.covariate_design[rows],
            censoring=None if self.censoring is None else self.censoring.take(rows),
            trials=None if self.trials is None else self.trials[rows],
        )

    def without_values(self) -> NLMEData:
        """The same design with ``values=None``: models then sample the observations (with
        the same detection limits and numbers of trials, which are part of the design)."""
        return dataclasses.replace(self, values=None)

    def with_values(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> NLMEData:
        """The same design with other observations (e.g. simulated ones) ``[V, S, P, T]``."""
        return dataclasses.replace(
            self, values=values.to(self.times), mask=self.mask if mask is None else mask
        )

    def to(self, device: torch.device | str) -> NLMEData:
        """A copy on ``device``; markers stay int8."""
        return dataclasses.replace(
            self,
            times=self.times.to(device),
            values=None if self.values is None else self.values.to(device),
            mask=self.mask.to(device),
            plant_mask=self.plant_mask.to(device),
            variety_index=self.variety_index.to(device),
            markers=None if self.markers is None else self.markers.to(device),
            covariate_design=self.covariate_design.to(device),
            censoring=None if self.censoring is None else self.censoring.to(device),
            trials=None if self.trials is None else self.trials.to(device),
        )

    def standardized_markers(self) -> torch.Tensor:
        """float32 ``[V, M]``: the standardised dosages of these varieties (a dense copy: models
        should prefer ``markers.standardized_matmul``).

        :raises ValueError: if the data has no genotypes.
        """
        if self.markers is None:
            raise ValueError("this model needs genotypes: pass markers (--markers FILE)")
        return self.markers.standardized()

    def observation_frame(self) -> pd.DataFrame:
        """One row per observed value (mask True), in C order of the grid: labels, time, value."""
        v, s, p, t = (axis.cpu().numpy() for axis in self.mask.nonzero(as_tuple=True))
        frame = pd.DataFrame(
            {
                "variety": np.asarray(self.variety_ids, dtype=object)[v],
                "scenario": np.asarray(self.scenario_names, dtype=object)[s],
                "plant": self.plant_ids[v, s, p],
                "time": self.times[v, s, p, t].cpu().numpy(),
            }
        )
        if self.values is not None:
            frame["value"] = self.values[v, s, p, t].cpu().numpy()
        return frame


def load_data(
    phenotypes: TableSource,
    markers: TableSource | None = None,
    covariates: TableSource | None = None,
    columns: str | Mapping[str, str] | None = None,
    covariate_columns: Sequence[str] = (),
    categorical: Sequence[str] | None = None,
    impute_missing_markers: bool = False,
    dtype: torch.dtype = torch.float32,
) -> NLMEData:
    """Read, validate and align phenotypes, genotypes and covariates.

    :param phenotypes: long table (CSV, Parquet or DataFrame), one row per measurement, columns
        ``variety, [scenario], [plant], time, value``; an empty value is a missing image (masked).
        Optional: ``cens`` (1 left-, -1 right-censored: the value is the detection limit; 0
        observed) with ``limit`` (the other bound of an interval-censored value), ``trials``
        (binomial observations: the value is a number of successes out of ``trials``).
    :param markers: genotype table: ``variety`` then one column per marker (dosage 0/1/2).
    :param covariates: per-variety covariate table with a ``variety`` column.
    :param columns: mapping of canonical names to the table's own, e.g.
        ``"variety=Tree,time=age,value=circumference"``.
    :param covariate_columns: per-variety covariates to use, from ``covariates`` or, when absent
        there, from the phenotype table (where they must be constant within a variety).
    :param categorical: covariates to treatment-code; by default those that are not numeric.
    :param impute_missing_markers: impute missing genotypes to marker means instead of failing.
    :raises DataError: naming the file, column, row and id of any invalid input.
    """
    table = rename_columns(read_table(phenotypes), parse_column_map(columns))
    check_required_columns(table)
    frame = _canonical_frame(table)
    check_no_duplicate_measurements(table, frame)
    check_plants_nested(table, frame)

    variety_order = list(dict.fromkeys(frame["variety"]))
    genotypes = None
    n_genotyped_only = 0
    if markers is not None:
        genotyped_ids, genotypes = read_genotypes(markers, impute_missing_markers)
        absent = sorted(set(variety_order) - set(genotyped_ids))
        if absent:
            raise DataError(
                f"{len(absent)} phenotyped variety(ies) of {table.where('variety')} are absent "
                f"from the genotype table {_source_name(markers)!r}: {absent[:20]}"
            )
        n_genotyped_only = len(genotyped_ids) - len(variety_order)
        variety_order = genotyped_ids
    design, design_names = _covariate_design(
        table, frame, covariates, covariate_columns, categorical, variety_order
    )
    grid = _dense_grid(frame, variety_order, dtype)
    censored = {} if grid["censoring"] is None else grid["censoring"].counts(grid["mask"])
    summary = DataSummary(
        source=table.source,
        n_rows=len(frame),
        n_varieties_phenotyped=int(grid["mask"].flatten(1).any(1).sum()),
        n_varieties_genotyped_only=n_genotyped_only,
        n_scenarios=len(grid["scenario_names"]),
        n_plants=int(grid["plant_mask"].sum()),
        n_distinct_times=int(frame["time"].nunique()),
        n_time_slots=grid["times"].shape[-1],
        n_observed=int(grid["mask"].sum()),
        n_missing_values=int(frame["value"].isna().sum()),
        n_removed_rows=0,
        n_markers=0 if genotypes is None else genotypes.n_markers,
        n_imputed_genotypes=0 if genotypes is None else genotypes.n_imputed,
        n_monomorphic_markers=0 if genotypes is None else genotypes.n_monomorphic,
        n_covariates=len(design_names),
        time_min=float(frame["time"].min()),
        time_max=float(frame["time"].max()),
        value_min=float(frame["value"].min()),
        value_max=float(frame["value"].max()),
        n_left_censored=censored.get("left", 0),
        n_right_censored=censored.get("right", 0),
        n_interval_censored=censored.get("interval", 0),
    )
    return NLMEData(
        markers=genotypes,
        covariate_design=torch.as_tensor(design, dtype=dtype),
        covariate_names=design_names,
        summary=summary,
        variety_ids=variety_order,
        variety_index=torch.arange(len(variety_order)),
        **grid,
    )


def _source_name(source: TableSource) -> str:
    return "DataFrame" if isinstance(source, pd.DataFrame) else str(source)


def _canonical_frame(table: Table) -> pd.DataFrame:
    """Text ids and numeric time/value; absent scenario/plant columns filled in."""
    raw = table.frame
    variety = text_column(table, "variety")
    scenario = (
        text_column(table, "scenario")
        if "scenario" in raw
        else pd.Series(DEFAULT_SCENARIO, index=raw.index)
    )
    plant = text_column(table, "plant") if "plant" in raw else variety + "|" + scenario
    value = numeric_column(table, "value", variety, allow_missing=True)
    frame = pd.DataFrame(
        {
            "variety": variety,
            "scenario": scenario,
            "plant": plant,
            "time": numeric_column(table, "time", variety, allow_missing=False),
            "value": value,
        }
    ).reset_index(drop=True)
    censoring = censoring_columns(table, value, variety)
    if censoring is not None:
        frame["cens"], frame["lower"], frame["upper"] = censoring
    trials = trials_column(table, value, variety)
    if trials is not None:
        frame["trials"] = trials
    return frame


def _dense_grid(frame: pd.DataFrame, variety_order: list[str], dtype: torch.dtype) -> dict:
    scenario_names = list(dict.fromkeys(frame["scenario"]))
    v = pd.Categorical(frame["variety"], categories=variety_order).codes.astype(np.int64)
    s = pd.Categorical(frame["scenario"], categories=scenario_names).codes.astype(np.int64)
    p = frame.groupby(["variety", "scenario"], sort=False)["plant"].transform(
        lambda plants: pd.factorize(plants)[0]
    )
    p = p.to_numpy(np.int64)
    order = np.lexsort((frame["time"].to_numpy(), p, s, v))
    t = np.empty(len(frame), np.int64)
    t[order] = (
        pd.Series(np.arange(len(frame)))[order]
        .groupby([v[order], s[order], p[order]], sort=False)
        .cumcount()
        .to_numpy()
    )
    shape = (len(variety_order), len(scenario_names), int(p.max()) + 1, int(t.max()) + 1)
    times = np.zeros(shape, np.float64)
    values = np.zeros(shape, np.float64)
    mask = np.zeros(shape, bool)
    present = np.zeros(shape, bool)
    plant_ids = np.full(shape[:3], "", dtype=object)
    value = frame["value"].to_numpy(np.float64)
    times[v, s, p, t] = frame["time"].to_numpy(np.float64)
    values[v, s, p, t] = np.nan_to_num(value)
    mask[v, s, p, t] = ~np.isnan(value)
    present[v, s, p, t] = True
    plant_ids[v, s, p] = frame["plant"].to_numpy(object)
    censoring = trials = None
    if "cens" in frame:
        code = np.zeros(shape, np.int8)
        lower = np.full(shape, -np.inf)
        upper = np.full(shape, np.inf)
        code[v, s, p, t] = frame["cens"].to_numpy()
        lower[v, s, p, t] = frame["lower"].to_numpy()
        upper[v, s, p, t] = frame["upper"].to_numpy()
        censoring = Censoring(
            torch.as_tensor(code),
            torch.as_tensor(lower, dtype=dtype),
            torch.as_tensor(upper, dtype=dtype),
        )
    if "trials" in frame:
        trials = np.ones(shape, np.int64)
        trials[v, s, p, t] = frame["trials"].to_numpy()
        trials = torch.as_tensor(trials)
    return {
        "censoring": censoring,
        "trials": trials,
        "times": torch.as_tensor(times, dtype=dtype),
        "values": torch.as_tensor(values, dtype=dtype),
        "mask": torch.as_tensor(mask),
        "plant_mask": torch.as_tensor(present.any(-1)),
        "scenario_names": scenario_names,
        "plant_ids": plant_ids,
    }


def _covariate_design(
    table: Table,
    frame: pd.DataFrame,
    covariates: TableSource | None,
    names: Sequence[str],
    categorical: Sequence[str] | None,
    variety_order: list[str],
) -> tuple[np.ndarray, list[str]]:
    """Per-variety covariates in variety order, categorical ones treatment-coded."""
    if not names:
        return np.zeros((len(variety_order), 0)), []
    external = read_table(covariates) if covariates is not None else None
    columns = {}
    for name in names:
        if external is not None and name in external.frame:
            source = external
            ids = text_column(external, "variety")
        elif name in table.frame:
            source = table
            ids = frame["variety"]
        else:
            where = table.where() + (f" and {external.where()}" if external else "")
            raise DataError(f"covariate column {name!r} is in neither {where}")
        per_variety = check_covariates_constant(source, ids, name)
        missing = sorted(set(variety_order) - set(per_variety.index))
        if missing:
            raise DataError(
                f"{source.where(name)}: no value for variety(ies) {missing[:20]} "
                f"({len(missing)} in all)"
            )
        columns[name] = per_variety.reindex(variety_order)
    values = pd.DataFrame(columns)
    if categorical is None:
        categorical = [c for c in names if pd.to_numeric(values[c], errors="coerce").isna().any()]
    blocks, design_names = [], []
    for name in names:
        if name in categorical:
            levels = list(dict.fromkeys(sorted(values[name].astype(str))))
            codes = pd.Categorical(values[name].astype(str), categories=levels)
            dummies = pd.get_dummies(codes, drop_first=True, dtype=float)
            blocks.append(dummies.to_numpy())
            design_names += [f"{name}[{level}]" for level in levels[1:]]
        else:
            blocks.append(pd.to_numeric(values[name]).to_numpy(float)[:, None])
            design_names.append(name)
    return np.concatenate(blocks, axis=1), design_names
