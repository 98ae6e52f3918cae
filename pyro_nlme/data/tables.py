"""Reading tables (CSV, Parquet or a pandas ``DataFrame``) and mapping their column names."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pyro_nlme.data.errors import DataError

TableSource = str | Path | pd.DataFrame

PHENOTYPE_COLUMNS = ("variety", "scenario", "plant", "time", "value", "cens", "limit", "trials")
"""Canonical phenotype columns; ``scenario``, ``plant``, ``cens``, ``limit`` (censoring) and
``trials`` (binomial observations) are optional."""


@dataclass(frozen=True)
class Table:
    """A table with the name of where it came from, for error messages.

    :param frame: the rows, with canonical column names after mapping.
    :param source: file path, or ``"DataFrame"``.
    :param is_file: whether ``source`` is a file (rows are then reported as file lines).
    """

    frame: pd.DataFrame
    source: str
    is_file: bool

    def row_label(self, position: int) -> str:
        """How to name the row at 0-based ``position`` in an error message."""
        if self.is_file:
            return f"line {position + 2}"
        label = self.frame.index[position]
        return f"row {label.item() if hasattr(label, 'item') else label!r}"

    def where(self, column: str | None = None) -> str:
        """``"file 'x.csv', column 'time'"``-style prefix for error messages."""
        kind = "file" if self.is_file else "table"
        text = f"{kind} {self.source!r}"
        return f"{text}, column {column!r}" if column is not None else text


def parse_column_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse ``"variety=Tree,time=age,value=circumference"`` into ``{canonical: file column}``.

    :raises DataError: on a malformed item or an unknown canonical name.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            if "=" not in item:
                raise DataError(f"--columns item {item!r} is not of the form canonical=column")
            key, value = (part.strip() for part in item.split("=", 1))
            items[key] = value
    unknown = sorted(set(items) - set(PHENOTYPE_COLUMNS))
    if unknown:
        raise DataError(
            f"--columns names unknown canonical column(s) {unknown}; "
            f"known: {list(PHENOTYPE_COLUMNS)}"
        )
    return items


def _file_header(path: Path) -> list[str]:
    """Column names as written in the file (duplicates kept, unlike pandas)."""
    if path.suffix.lower() == ".parquet":
        return list(pq.read_schema(path).names)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [name.strip() for name in next(csv.reader(handle), [])]


def _check_unique_columns(columns: list[str], where: str) -> None:
    seen: set[str] = set()
    duplicated = [c for c in columns if c in seen or seen.add(c)]
    if duplicated:
        raise DataError(f"{where}: duplicated column(s) {sorted(set(duplicated))}")


def read_table(source: TableSource, dtype: Mapping[str, object] | None = None) -> Table:
    """Read a CSV or Parquet file, or wrap a ``DataFrame``, refusing duplicated column names.

    Every CSV column is read as text (``dtype=str``) unless ``dtype`` says otherwise, so that ids
    such as ``"001"`` keep their leading zeros and numeric checks can name the offending cell.

    :raises DataError: if the file is missing, unreadable or has duplicated column names.
    """
    if isinstance(source, pd.DataFrame):
        _check_unique_columns([str(c) for c in source.columns], "table 'DataFrame'")
        frame = source.copy()
        frame.columns = [str(c) for c in frame.columns]
        return Table(frame, "DataFrame", is_file=False)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"file {str(path)!r} does not exist")
    header = _file_header(path)
    if not header:
        raise DataError(f"file {str(path)!r} is empty")
    _check_unique_columns([str(c) for c in header], f"file {str(path)!r}")
    if path.suffix.lower() == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=dtype or str, keep_default_na=False, na_values=[""])
    return Table(frame, str(path), is_file=True)


def rename_columns(table: Table, column_map: Mapping[str, str]) -> Table:
    """Rename mapped file columns to their canonical names.

    :raises DataError: if a mapped column is absent from the table.
    """
    missing = [f"{canon}={col}" for canon, col in column_map.items() if col not in table.frame]
    if missing:
        raise DataError(
            f"{table.where()}: --columns maps {missing} but the table has no such column; "
            f"its columns are {list(table.frame.columns)[:20]}"
        )
    frame = table.frame.rename(columns={col: canon for canon, col in column_map.items()})
    _check_unique_columns(list(frame.columns), f"{table.where()} after --columns mapping")
    return Table(frame, table.source, table.is_file)


def count_rows(source: TableSource) -> int:
    """Data rows of a table (an upper bound for CSV: lines after the header), read cheaply so
    that a reader can fill one preallocated array instead of concatenating blocks."""
    if isinstance(source, pd.DataFrame):
        return len(source)
    path = Path(source)
    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    lines = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            lines += chunk.count(b"\n")
            last = chunk
    ends_with_newline = lines and last.endswith(b"\n")
    return lines - 1 + (0 if ends_with_newline else 1)


def iter_marker_row_blocks(
    source: TableSource, block_rows: int = 256
) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """Stream a wide genotype table in blocks of rows without materialising a float matrix.

    Files are parsed by pyarrow (markers as float32, only an empty cell missing) and each
    block goes to numpy in one call (``RecordBatch.to_tensor``), never through a 60,000-column
    pandas frame.

    :param source: CSV or Parquet path, or a ``DataFrame``; first column ``variety``, then one
        column per marker.
    :yields: ``(marker_ids, variety_ids, block)`` with ``block`` float of shape
        ``[rows_in_block, n_markers]`` (NaN = missing), for the caller to check and cast.
    :raises DataError: if the first column is not ``variety``, a column name is duplicated, an
        id is empty or a dosage is not a number.
    """
    if isinstance(source, pd.DataFrame):
        names = [str(c) for c in source.columns]
        where = "table 'DataFrame'"
        blocks = iter([(source.iloc[:, 0], lambda: _numeric_block(source, where))])
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"file {str(path)!r} does not exist")
        names = [str(c) for c in _file_header(path)]
        where = f"file {str(path)!r}"
        blocks = _file_blocks(path, names, block_rows, where)
    _check_unique_columns(names, where)
    if not names or names[0] != "variety":
        raise DataError(f"{where}: the first column must be 'variety', got {names[:1]}")
    for raw_ids, block in blocks:
        ids = pd.Series(raw_ids).astype("string").str.strip()
        empty = np.flatnonzero((ids.isna() | (ids == "")).to_numpy())
        if len(empty):
            raise DataError(f"{where}, column 'variety': empty variety id in row {empty[0] + 1}")
        yield names[1:], ids.astype(str).tolist(), block()


def _csv_row(line: bytes, n_markers: int, line_number: int, names: list[str], where: str):
    """``(id, dosages float32 [n_markers])`` of one CSV data line.

    Fast path: an unquoted id, then single-digit cells separated by commas, read as bytes with
    no per-cell Python work. Any other line (empty cells, spaces, ``1.0``, quotes) goes through
    the ``csv`` module, cell by cell.
    """
    text = line.rstrip(b"\r\n")
    comma = text.find(b",")
    payload = np.frombuffer(text, np.uint8)[comma + 1 :]
    if (
        comma > 0
        and not text.startswith(b'"')
        and len(payload) == 2 * n_markers - 1
        and (payload[1::2] == ord(",")).all()
    ):
        digits = payload[::2]
        if ((digits >= ord("0")) & (digits <= ord("9"))).all():
            return text[:comma].decode("utf-8"), (digits - ord("0")).astype(np.float32)
    row = next(csv.reader([text.decode("utf-8")]))
    if len(row) != n_markers + 1:
        raise DataError(
            f"{where}, line {line_number}: {len(row)} cells, the header has {n_markers + 1}"
        )
    values = np.full(n_markers, np.nan, np.float32)
    for column, cell in enumerate(row[1:]):
        cell = cell.strip()
        if not cell:
            continue
        number = pd.to_numeric(cell, errors="coerce")
        if pd.isna(number):
            raise DataError(
                f"{where}, column {names[column + 1]!r}, line {line_number}, variety "
                f"{row[0].strip()!r}: dosage {cell!r} is not a number (expected 0, 1 or 2, "
                "or an empty cell for a missing genotype)"
            )
        values[column] = number
    return row[0], values


def _csv_blocks(path: Path, names: list[str], block_rows: int, where: str):
    """``(ids, block())`` per ``block_rows`` data lines of a genotype CSV."""
    n_markers = len(names) - 1
    with open(path, "rb") as handle:
        handle.readline()  # header, read by _file_header
        line_number = 1
        while True:
            ids, rows = [], []
            for line in handle:
                line_number += 1
                if not line.strip():
                    continue
                variety, values = _csv_row(line, n_markers, line_number, names, where)
                ids.append(variety)
                rows.append(values)
                if len(rows) == block_rows:
                    break
            if not rows:
                return
            block = np.stack(rows)
            yield ids, lambda block=block: block


def _file_blocks(path: Path, names: list[str], block_rows: int, where: str):
    """``(ids, block())`` per block of rows; ``block()`` gives the markers as numpy."""
    if path.suffix.lower() != ".parquet":
        yield from _csv_blocks(path, names, block_rows, where)
        return
    for batch in pq.ParquetFile(path).iter_batches(batch_size=block_rows):
        markers = batch.select(range(1, batch.num_columns))
        if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in markers.schema.types):
            columns = [column.cast(pa.float32()) for column in markers.columns]
            uniform = pa.RecordBatch.from_arrays(columns, names=markers.schema.names)

            def block(uniform=uniform) -> np.ndarray:
                return np.asarray(uniform.to_tensor(null_to_nan=True, row_major=True))

        else:  # text in a marker column: find and name the bad cell

            def block(batch=batch) -> np.ndarray:
                return _numeric_block(batch.to_pandas(), where)

        yield batch.column(0).to_pandas(), block


def _numeric_block(frame: pd.DataFrame, where: str) -> np.ndarray:
    values = frame.iloc[:, 1:]
    converted = {}
    for column, dtype in values.dtypes.items():
        if pd.api.types.is_numeric_dtype(dtype):
            continue
        coerced = pd.to_numeric(values[column], errors="coerce")
        converted[column] = coerced
        bad = np.flatnonzero(coerced.isna().to_numpy() & values[column].notna().to_numpy())
        if len(bad):
            raise DataError(
                f"{where}, column {column!r}, variety {frame.iloc[bad[0], 0]!r}: dosage "
                f"{values[column].iloc[bad[0]]!r} is not a number (expected 0, 1 or 2, or an "
                "empty cell for a missing genotype)"
            )
    if converted:
        values = values.assign(**converted)
    return values.to_numpy(dtype=np.float64, na_value=np.nan)
