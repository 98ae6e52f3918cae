"""Checks of the phenotype table. Each raises :class:`DataError` naming file, column, row, id."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pyro_nlme.data.errors import DataError
from pyro_nlme.data.tables import Table

REQUIRED_COLUMNS = ("variety", "time", "value")
MAX_LISTED = 10
"""How many offending rows an error message lists."""


def _rows(table: Table, positions: np.ndarray) -> str:
    listed = ", ".join(table.row_label(int(i)) for i in positions[:MAX_LISTED])
    more = f" and {len(positions) - MAX_LISTED} more" if len(positions) > MAX_LISTED else ""
    return listed + more


def check_required_columns(table: Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.frame]
    if missing:
        raise DataError(
            f"{table.where()}: missing required column(s) {missing}; its columns are "
            f"{list(table.frame.columns)[:20]} (map names with --columns, e.g. "
            "variety=Tree,time=age,value=circumference)"
        )


def text_column(table: Table, column: str) -> pd.Series:
    """A column of ids as stripped text; an empty id is an error."""
    raw = table.frame[column]
    text = raw.astype("string").str.strip()
    empty = np.flatnonzero((text.isna() | (text == "")).to_numpy())
    if len(empty):
        raise DataError(f"{table.where(column)}: empty id at {_rows(table, empty)}")
    return text.astype(object).reset_index(drop=True)


def _cells(table: Table, positions: np.ndarray, variety: pd.Series, raw: pd.Series) -> str:
    shown = ", ".join(
        f"{table.row_label(int(i))} (variety {variety.iloc[i]!r}, {raw.iloc[i]!r})"
        for i in positions[:MAX_LISTED]
    )
    more = f" and {len(positions) - MAX_LISTED} more" if len(positions) > MAX_LISTED else ""
    return shown + more


def numeric_column(table: Table, column: str, variety: pd.Series, allow_missing: bool) -> pd.Series:
    """A numeric column; non-numeric or infinite cells are errors, empty cells are NaN
    (allowed only if ``allow_missing``). Errors name the line and the variety id."""
    raw = table.frame[column].reset_index(drop=True)
    numbers = pd.to_numeric(raw, errors="coerce").astype(float)
    empty = raw.isna() | (raw.astype("string").str.strip() == "")
    not_numeric = np.flatnonzero((numbers.isna() & ~empty).to_numpy())
    if len(not_numeric):
        raise DataError(
            f"{table.where(column)}: {len(not_numeric)} non-numeric value(s) at "
            f"{_cells(table, not_numeric, variety, raw)}"
        )
    infinite = np.flatnonzero(np.isinf(numbers.to_numpy()))
    if len(infinite):
        raise DataError(
            f"{table.where(column)}: infinite value(s) at {_cells(table, infinite, variety, raw)}"
        )
    if not allow_missing:
        missing = np.flatnonzero(empty.to_numpy())
        if len(missing):
            raise DataError(
                f"{table.where(column)}: empty cell(s) at {_cells(table, missing, variety, raw)}"
            )
    return numbers


def check_no_duplicate_measurements(table: Table, frame: pd.DataFrame) -> None:
    """No two rows share (variety, scenario, plant, time)."""
    key = ["variety", "scenario", "plant", "time"]
    duplicated = frame.duplicated(key, keep=False).to_numpy()
    if duplicated.any():
        positions = np.flatnonzero(duplicated)
        first = frame.iloc[positions[0]]
        raise DataError(
            f"{table.where()}: {len(positions)} rows share a (variety, scenario, plant, time), "
            f"e.g. variety {first['variety']!r}, scenario {first['scenario']!r}, plant "
            f"{first['plant']!r}, time {first['time']:g}, at {_rows(table, positions)}"
        )


def check_plants_nested(table: Table, frame: pd.DataFrame) -> None:
    """A plant id belongs to one variety and one scenario."""
    owners = frame.groupby("plant", sort=False)[["variety", "scenario"]].nunique()
    reused = owners[(owners > 1).any(axis=1)]
    if len(reused):
        plant = reused.index[0]
        rows = frame.index[frame["plant"] == plant].to_numpy()
        pairs = frame.loc[rows, ["variety", "scenario"]].drop_duplicates().values.tolist()
        raise DataError(
            f"{table.where('plant')}: plant id {plant!r} is used under several (variety, "
            f"scenario) pairs {pairs} at {_rows(table, rows)} "
            f"({len(reused)} such plant id(s))"
        )


def check_covariates_constant(table: Table, variety: pd.Series, column: str) -> pd.Series:
    """The covariate's one value per variety; it must not vary within a variety nor be empty.

    :returns: a Series indexed by variety id.
    """
    values = table.frame[column].reset_index(drop=True)
    empty = np.flatnonzero(values.isna().to_numpy())
    if len(empty):
        raise DataError(f"{table.where(column)}: empty covariate at {_rows(table, empty)}")
    counts = values.groupby(variety.to_numpy(), sort=False).nunique()
    varying = counts[counts > 1]
    if len(varying):
        rows = np.flatnonzero((variety == varying.index[0]).to_numpy())
        raise DataError(
            f"{table.where(column)}: covariate varies within variety {varying.index[0]!r} at "
            f"{_rows(table, rows)} ({len(varying)} such variety(ies))"
        )
    return values.groupby(variety.to_numpy(), sort=False).first()
