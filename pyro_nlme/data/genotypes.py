"""The genotype matrix: allele dosages kept as int8, standardised per minibatch on demand."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pyro_nlme.data.errors import DataError
from pyro_nlme.data.tables import TableSource, count_rows, iter_marker_row_blocks

MISSING_DOSAGE = -1
"""int8 code of a missing genotype (imputed to the marker mean when standardised)."""


_FLOAT_BLOCK_CACHE: dict[str, tuple] = {}
"""One entry: the last float conversion of a minibatch (see ``GenotypeMatrix._float_block``)."""


@dataclass(frozen=True)
class GenotypeMatrix:
    """Allele dosages of ``n_varieties`` varieties at ``n_markers`` SNPs.

    The dosages stay int8 (1 byte a cell: 10,000 x 60,000 is 600 MB); only the rows a minibatch
    asks for are converted to float and standardised with the column means and SDs computed once
    over all rows. Standardised missing genotypes are 0 (mean imputation); monomorphic markers
    are 0 everywhere.

    :param dosages: int8 tensor ``[n_varieties, n_markers]`` with values 0, 1, 2 or
        :data:`MISSING_DOSAGE`.
    :param marker_ids: marker labels, length ``n_markers``.
    :param mean: float32 ``[n_markers]``, mean dosage over non-missing rows.
    :param scale: float32 ``[n_markers]``, dosage SD (1 where the marker is monomorphic).
    :param monomorphic: bool ``[n_markers]``, markers with zero variance (standardised to 0).
    :param n_imputed: number of missing genotypes imputed to the mean.
    :param n_monomorphic: number of markers with zero variance.
    """

    dosages: torch.Tensor
    marker_ids: list[str]
    mean: torch.Tensor
    scale: torch.Tensor
    monomorphic: torch.Tensor
    n_imputed: int
    rows: torch.Tensor | None = None

    @classmethod
    def from_dosages(
        cls, dosages: np.ndarray | torch.Tensor, marker_ids: list[str], chunk_rows: int = 256
    ) -> GenotypeMatrix:
        """Build from an int8 array. Column moments come from counts of each dosage, taken in
        chunks of rows on the int8 data (no float copy, a few MB of temporaries).

        :param dosages: ``[n_varieties, n_markers]`` int8, missing coded :data:`MISSING_DOSAGE`.
        """
        dosages = torch.as_tensor(dosages)
        if dosages.dtype != torch.int8:
            raise TypeError(f"dosages must be int8, got {dosages.dtype}")
        counts = torch.zeros(3, dosages.shape[1], dtype=torch.int64)
        for start in range(0, dosages.shape[0], chunk_rows):
            block = dosages[start : start + chunk_rows]
            for value in range(3):
                counts[value] += (block == value).sum(0)
        present = counts.sum(0).clamp(min=1).double()
        mean = (counts[1] + 2 * counts[2]) / present
        variance = ((counts[1] + 4 * counts[2]) / present - mean**2).clamp(min=0)
        monomorphic = variance <= 1e-12
        scale = torch.where(monomorphic, torch.ones_like(variance), variance.sqrt())
        return cls(
            dosages=dosages,
            marker_ids=list(marker_ids),
            mean=mean.float(),
            scale=scale.float(),
            monomorphic=monomorphic,
            n_imputed=dosages.shape[0] * dosages.shape[1] - int(counts.sum()),
        )

    @property
    def n_varieties(self) -> int:
        return self.dosages.shape[0] if self.rows is None else len(self.rows)

    @property
    def n_markers(self) -> int:
        return self.dosages.shape[1]

    @property
    def n_monomorphic(self) -> int:
        return int(self.monomorphic.sum())

    def _block(self, rows: torch.Tensor | None) -> torch.Tensor:
        """int8 dosages of ``rows`` (positions in this matrix; None: all)."""
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.dosages.device)
            rows = rows if self.rows is None else self.rows[rows]
        else:
            rows = self.rows
        return self.dosages if rows is None else self.dosages[rows]

    def standardized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised dosages of ``rows`` (positions in this matrix; None: all), float32
        ``[len(rows), n_markers]``, on the device of the dosages. Missing genotypes and
        monomorphic markers give 0."""
        return self._standardize(self._block(rows), slice(None))

    def standardized_columns(
        self, columns: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Standardised dosages of the markers ``columns`` (indices) for every row,
        ``[n_varieties, len(columns)]`` in ``dtype`` (default float32): a block of markers, e.g.
        for coordinate updates of their effects. Missing genotypes and monomorphic markers give
        0."""
        return self._standardize(self._block(None)[:, columns], columns, dtype)

    def _standardize(
        self, block: torch.Tensor, columns: torch.Tensor | slice, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        dtype = dtype or self.mean.dtype
        mean, scale = self.mean[columns].to(dtype), self.scale[columns].to(dtype)
        values = (block.to(dtype) - mean) / scale
        return values.masked_fill((block == MISSING_DOSAGE) | self.monomorphic[columns], 0.0)

    def standardized_matmul(
        self, weights: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``standardized() @ weights`` without forming the standardised matrix:
        ``D @ (weights / scale) - (mean / scale) @ weights`` with one int8 -> float conversion
        of the rows (missing genotypes read as the marker mean, so they contribute 0;
        monomorphic markers contribute 0 since their dosage equals their mean).

        :param weights: ``[n_markers, K]`` (e.g. marker effects, or a layer's weights).
        :param rows: positions in this matrix (None: all).
        :returns: ``[len(rows), K]``.
        """
        values = self._float_block(rows, weights.dtype)
        scaled = weights / self.scale[:, None].to(weights)
        return values @ scaled - self.mean.to(weights) @ scaled

    def standardized_rmatmul(
        self, values: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``standardized(rows).T @ values`` without forming the standardised matrix, with one
        int8 -> float conversion of the rows (as :meth:`standardized_matmul`).

        :param values: ``[len(rows), K]`` (e.g. residuals per variety).
        :returns: ``[n_markers, K]``.
        """
        block = self._float_block(rows, values.dtype)
        centred = block.T @ values - self.mean.to(values)[:, None] * values.sum(0)
        return centred / self.scale.to(values)[:, None]

    def column_chunks(self, chunk_markers: int = 4096) -> Iterator[torch.Tensor]:
        """Indices of consecutive markers, ``chunk_markers`` at a time (on the dosages'
        device)."""
        for start in range(0, self.n_markers, chunk_markers):
            stop = min(start + chunk_markers, self.n_markers)
            yield torch.arange(start, stop, device=self.dosages.device)

    def standardized_gram(self, weights: torch.Tensor, chunk_markers: int = 4096) -> torch.Tensor:
        """``Z diag(weights[:, k]) Z.T`` for every column ``k`` of ``weights`` ``[n_markers,
        K]``, with ``Z = standardized()``: ``[K, n_varieties, n_varieties]`` in the dtype of
        ``weights``, accumulated over chunks of ``chunk_markers`` markers (no float copy of the
        whole matrix)."""
        gram = weights.new_zeros(weights.shape[1], self.n_varieties, self.n_varieties)
        for columns in self.column_chunks(chunk_markers):
            z = self.standardized_columns(columns, weights.dtype)  # [V, C]
            gram += (z * weights[columns].T[:, None, :]) @ z.T
        return gram

    def _float_block(self, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The rows as floats, missing genotypes at the marker mean. The last result is kept
        while the same row-index tensor comes back (model and guide of one SVI step share the
        minibatch's index tensor), so a step converts its minibatch once."""
        key = (self.dosages, self.rows, rows, dtype)
        cached = _FLOAT_BLOCK_CACHE.get("last")
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        block = self._block(rows)
        values = block.to(dtype)
        if self.n_imputed:
            values = torch.where(block == MISSING_DOSAGE, self.mean.to(dtype), values)
        _FLOAT_BLOCK_CACHE["last"] = (key, values)
        return values

    def take(self, rows: torch.Tensor | np.ndarray) -> GenotypeMatrix:
        """The same markers and standardisation for a subset of rows (no copy of dosages)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.dosages.device)
        return dataclasses.replace(self, rows=rows if self.rows is None else self.rows[rows])

    def to(self, device: torch.device | str) -> GenotypeMatrix:
        return dataclasses.replace(
            self,
            dosages=self.dosages.to(device),
            mean=self.mean.to(device),
            scale=self.scale.to(device),
            monomorphic=self.monomorphic.to(device),
            rows=None if self.rows is None else self.rows.to(device),
        )


def read_genotypes(
    source: TableSource, impute_missing: bool = False
) -> tuple[list[str], GenotypeMatrix]:
    """Read a genotype table: a ``variety`` column, then one column per marker (dosage 0/1/2).

    Files are streamed in blocks of rows straight into an int8 matrix.

    :param impute_missing: if False (default) an empty cell is an error; if True it is imputed
        to the marker mean (the count is kept in :attr:`GenotypeMatrix.n_imputed`).
    :returns: ``(variety_ids, matrix)``.
    :raises DataError: naming the file, marker column and variety of a dosage outside {0, 1, 2},
        of a missing genotype (unless imputed), or a duplicated variety.
    """
    where = "table 'DataFrame'" if isinstance(source, pd.DataFrame) else f"file {str(source)!r}"
    dosages: np.ndarray | None = None
    variety_ids: list[str] = []
    marker_ids: list[str] = []
    for marker_ids, ids, block in iter_marker_row_blocks(source):
        if dosages is None:
            dosages = np.empty((count_rows(source), len(marker_ids)), np.int8)
        start = len(variety_ids)
        dosages[start : start + len(ids)] = _to_dosages(
            block, ids, marker_ids, where, impute_missing
        )
        variety_ids.extend(ids)
    if not marker_ids:
        raise DataError(f"{where}: no marker columns after 'variety'")
    _check_unique_varieties(variety_ids, where)
    dosages = dosages[: len(variety_ids)]
    return variety_ids, GenotypeMatrix.from_dosages(dosages, marker_ids)


def _to_dosages(
    block: np.ndarray, ids: list[str], marker_ids: list[str], where: str, impute_missing: bool
) -> np.ndarray:
    missing = np.isnan(block)
    if missing.any() and not impute_missing:
        row, col = np.argwhere(missing)[0]
        raise DataError(
            f"{where}, column {marker_ids[col]!r}, variety {ids[row]!r}: missing genotype "
            f"({int(missing.sum())} missing in this block of {len(ids)} varieties); "
            "pass impute_missing=True (--impute-markers mean) to impute marker means"
        )
    invalid = ~missing & (block != 0) & (block != 1) & (block != 2)
    if invalid.any():
        row, col = np.argwhere(invalid)[0]
        raise DataError(
            f"{where}, column {marker_ids[col]!r}, variety {ids[row]!r}: dosage "
            f"{block[row, col]:g} is outside {{0, 1, 2}} ({int(invalid.sum())} such cells in "
            f"this block of {len(ids)} varieties)"
        )
    return np.where(missing, MISSING_DOSAGE, block).astype(np.int8)


def _check_unique_varieties(variety_ids: list[str], where: str) -> None:
    counts = pd.Series(variety_ids).value_counts()
    duplicated = counts[counts > 1]
    if len(duplicated):
        raise DataError(
            f"{where}, column 'variety': duplicated variety id(s) {duplicated.index.tolist()[:10]}"
        )
