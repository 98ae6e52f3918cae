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


CENSORING_CODES = (-1, 0, 1)
"""Values of the ``cens`` column: 1 left-censored, -1 right-censored, 0 observed."""


def _integers(numbers: pd.Series) -> np.ndarray:
    """bool: which cells hold an integer (NaN: no)."""
    values = numbers.to_numpy()
    return np.isfinite(values) & (values == np.round(values))


def censoring_columns(
    table: Table, value: pd.Series, variety: pd.Series
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The censoring of each row from the ``cens`` and optional ``limit`` columns (Monolix,
    nlmixr2): ``cens`` 1, the value is an upper bound (and ``limit``, if given, a lower one);
    -1, a lower bound (``limit`` an upper one); 0, an exact value.

    :param value: the numeric ``value`` column (NaN: missing image).
    :returns: ``(code int8, lower, upper)`` per row (bounds ``-inf``/``+inf`` where open), or
        None without a ``cens`` column.
    :raises DataError: on a ``limit`` column without ``cens``, a code not in {-1, 0, 1}, a
        censored row without a value, a limit on an uncensored row or on the wrong side of the
        value.
    """
    frame = table.frame
    if "cens" not in frame:
        if "limit" in frame:
            raise DataError(
                f"{table.where('limit')}: a limit column needs a cens column (1 left-, -1 right-"
                "censored, 0 observed)"
            )
        return None
    code = numeric_column(table, "cens", variety, allow_missing=True)
    raw = frame["cens"].reset_index(drop=True)
    missing = value.isna().to_numpy()
    empty = code.isna().to_numpy()
    bad = np.flatnonzero(~empty & ~np.isin(code.to_numpy(), CENSORING_CODES))
    if len(bad):
        raise DataError(
            f"{table.where('cens')}: censoring code(s) not in {{-1, 0, 1}} at "
            f"{_cells(table, bad, variety, raw)}"
        )
    unset = np.flatnonzero(empty & ~missing)
    if len(unset):
        raise DataError(
            f"{table.where('cens')}: empty censoring code(s) beside a value at "
            f"{_cells(table, unset, variety, raw)} (0: observed exactly)"
        )
    code = np.nan_to_num(code.to_numpy()).astype(np.int8)
    without_bound = np.flatnonzero((code != 0) & missing)
    if len(without_bound):
        raise DataError(
            f"{table.where('value')}: censored row(s) (cens {code[without_bound[0]]}) without a "
            f"value, which must hold the detection limit, at "
            f"{_cells(table, without_bound, variety, raw)}"
        )
    values = value.to_numpy()
    lower = np.where(code == -1, values, -np.inf)
    upper = np.where(code == 1, values, np.inf)
    if "limit" in frame:
        limit = numeric_column(table, "limit", variety, allow_missing=True).to_numpy()
        raw_limit = frame["limit"].reset_index(drop=True)
        given = ~np.isnan(limit)
        on_observed = np.flatnonzero(given & (code == 0))
        if len(on_observed):
            raise DataError(
                f"{table.where('limit')}: limit given on uncensored row(s) (cens 0) at "
                f"{_cells(table, on_observed, variety, raw_limit)}; leave it empty there"
            )
        wrong = given & (((code == 1) & (limit >= values)) | ((code == -1) & (limit <= values)))
        wrong_rows = np.flatnonzero(wrong)
        if len(wrong_rows):
            raise DataError(
                f"{table.where('limit')}: limit on the wrong side of the value at "
                f"{_cells(table, wrong_rows, variety, raw_limit)} (cens 1: limit < value, the "
                "value an upper bound; cens -1: limit > value)"
            )
        lower = np.where(given & (code == 1), limit, lower)
        upper = np.where(given & (code == -1), limit, upper)
    return code, lower, upper


def trials_column(table: Table, value: pd.Series, variety: pd.Series) -> np.ndarray | None:
    """The number of trials of each row (binomial observations), from a ``trials`` column.

    :param value: the numeric ``value`` column (NaN: missing image).
    :returns: int64 trials per row (1 where the value is missing), or None without the column.
    :raises DataError: on a trials cell that is not a positive integer beside a value, or a
        value that is not an integer in ``0 .. trials``.
    """
    if "trials" not in table.frame:
        return None
    trials = numeric_column(table, "trials", variety, allow_missing=True)
    raw = table.frame["trials"].reset_index(drop=True)
    observed = value.notna().to_numpy()
    bad = np.flatnonzero(observed & ~(_integers(trials) & (trials.to_numpy() >= 1)))
    if len(bad):
        raise DataError(
            f"{table.where('trials')}: number of trials not a positive integer at "
            f"{_cells(table, bad, variety, raw)}"
        )
    count = value.to_numpy()
    out_of_range = observed & ~(_integers(value) & (count >= 0) & (count <= trials.to_numpy()))
    rows = np.flatnonzero(out_of_range)
    if len(rows):
        raw_value = table.frame["value"].reset_index(drop=True)
        raise DataError(
            f"{table.where('value')}: value(s) not an integer count of successes in 0 .. trials "
            f"at {_cells(table, rows, variety, raw_value)}"
        )
    return np.where(observed, np.nan_to_num(trials.to_numpy(), nan=1.0), 1.0).astype(np.int64)
