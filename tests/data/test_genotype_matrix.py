"""GenotypeMatrix: int8 storage, standardisation against a float reference, minibatch views, and
the memory of reading a wide genotype file."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_nlme.data import DataError, GenotypeMatrix, load_data, read_genotypes
from pyro_nlme.data.genotypes import MISSING_DOSAGE
from pyro_nlme.simulate import write_markers_csv


def reference_standardized(dosages: np.ndarray) -> np.ndarray:
    """float64 reference: column mean and (population) SD over the non-missing rows of all
    varieties; missing cells and monomorphic markers give 0."""
    values = np.where(dosages == MISSING_DOSAGE, np.nan, dosages.astype(np.float64))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-missing marker
        mean = np.nanmean(values, axis=0)
        sd = np.nanstd(values, axis=0)
        z = (values - mean) / sd
    z[:, ~(sd > 1e-6)] = 0.0
    return np.nan_to_num(z, nan=0.0)


@pytest.fixture
def dosages() -> np.ndarray:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 3, size=(40, 12)).astype(np.int8)
    array[rng.random(array.shape) < 0.1] = MISSING_DOSAGE
    array[:, 3] = 2  # monomorphic
    array[:, 7] = 1
    array[5, 7] = MISSING_DOSAGE  # monomorphic with a missing cell
    array[:, 9] = MISSING_DOSAGE  # nothing observed
    return array


def test_storage_is_int8_and_moments_float32(dosages):
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)], chunk_rows=7)
    assert matrix.dosages.dtype == torch.int8
    assert matrix.mean.dtype == torch.float32 and matrix.scale.dtype == torch.float32
    assert matrix.n_varieties == 40 and matrix.n_markers == 12
    assert matrix.n_imputed == int((dosages == MISSING_DOSAGE).sum())
    assert matrix.monomorphic.nonzero().flatten().tolist() == [3, 7, 9]
    assert matrix.n_monomorphic == 3


def test_standardized_equals_float_reference(dosages):
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)], chunk_rows=7)
    reference = reference_standardized(dosages)
    z = matrix.standardized()
    assert z.dtype == torch.float32 and tuple(z.shape) == (40, 12)
    np.testing.assert_allclose(z.numpy(), reference, atol=1e-5)
    assert z[torch.as_tensor(dosages == MISSING_DOSAGE)].eq(0).all()
    assert z[:, [3, 7, 9]].eq(0).all()
    rows = torch.tensor([39, 0, 17, 17])
    np.testing.assert_allclose(
        matrix.standardized(rows).numpy(), reference[[39, 0, 17, 17]], atol=1e-5
    )

    columns = torch.tensor([9, 0, 7, 2])
    np.testing.assert_allclose(
        matrix.take(rows).standardized_columns(columns).numpy(),
        reference[[39, 0, 17, 17]][:, [9, 0, 7, 2]],
        atol=1e-5,
    )


def test_take_keeps_full_data_standardisation(dosages):
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)])
    rows = torch.tensor([4, 2, 30])
    part = matrix.take(rows)
    assert part.dosages.dtype == torch.int8 and part.n_varieties == 3
    assert torch.equal(part.standardized(), matrix.standardized(rows))
    # A subset's own moments would differ: take must not recompute them.
    own = GenotypeMatrix.from_dosages(dosages[[4, 2, 30]], part.marker_ids)
    assert not torch.allclose(own.standardized(), part.standardized())
    assert torch.equal(matrix.take(np.array([1])).standardized(), matrix.standardized([1]))


def test_nested_take_and_standardized_matmul(dosages):
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)])
    reference = reference_standardized(dosages)
    inner = matrix.take(torch.tensor([30, 4, 2, 9])).take(torch.tensor([2, 0]))
    assert inner.n_varieties == 2
    np.testing.assert_allclose(inner.standardized().numpy(), reference[[2, 30]], atol=1e-5)
    weights = torch.randn(12, 3, dtype=torch.float64)
    np.testing.assert_allclose(
        matrix.standardized_matmul(weights).numpy(), reference @ weights.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        inner.standardized_matmul(weights).numpy(),
        reference[[2, 30]] @ weights.numpy(),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        matrix.standardized_matmul(weights, rows=torch.tensor([7])).numpy(),
        reference[[7]] @ weights.numpy(),
        atol=1e-5,
    )


def test_transposed_matmul_and_weighted_gram(dosages):
    """``Z.T @ values`` and ``Z diag(w_k) Z.T`` against the float64 reference, missing and
    monomorphic markers included, on a subset of rows and over several marker chunks."""
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)])
    rows = torch.tensor([30, 4, 2, 9, 17])
    reference = reference_standardized(dosages)[rows.numpy()]
    subset = matrix.take(rows)
    values = torch.randn(5, 3, dtype=torch.float64)
    np.testing.assert_allclose(
        subset.standardized_rmatmul(values).numpy(), reference.T @ values.numpy(), atol=1e-5
    )
    weights = torch.rand(12, 2, dtype=torch.float64)
    expected = np.stack([(reference * w) @ reference.T for w in weights.numpy().T])
    np.testing.assert_allclose(
        subset.standardized_gram(weights, chunk_markers=5).numpy(), expected, atol=1e-5
    )


def test_to_keeps_int8(dosages):
    matrix = GenotypeMatrix.from_dosages(dosages, [f"m{j}" for j in range(12)]).to("cpu")
    assert matrix.dosages.dtype == torch.int8
    np.testing.assert_allclose(
        matrix.standardized().numpy(), reference_standardized(dosages), atol=1e-5
    )


def test_from_dosages_refuses_other_dtypes(dosages):
    with pytest.raises(TypeError, match="int8"):
        GenotypeMatrix.from_dosages(dosages.astype(np.int64), [f"m{j}" for j in range(12)])


def test_read_genotypes_from_dataframe_matches_reference(dosages):
    frame = pd.DataFrame(np.where(dosages == MISSING_DOSAGE, np.nan, dosages))
    frame.columns = [f"m{j}" for j in range(12)]
    frame.insert(0, "variety", [f"v{i}" for i in range(40)])
    ids, matrix = read_genotypes(frame, impute_missing=True)
    assert ids == [f"v{i}" for i in range(40)]
    assert matrix.marker_ids == [f"m{j}" for j in range(12)]
    assert matrix.dosages.dtype == torch.int8
    assert torch.equal(matrix.dosages, torch.as_tensor(dosages))
    np.testing.assert_allclose(
        matrix.standardized().numpy(), reference_standardized(dosages), atol=1e-5
    )


@pytest.fixture(scope="module")
def wide_csv(tmp_path_factory):
    """A 2,000 x 5,000 genotype CSV (20 MB: more than one 16 MB pyarrow block)."""
    n_varieties, n_markers = 2_000, 5_000
    dosages = np.random.default_rng(0).integers(0, 3, (n_varieties, n_markers)).astype(np.int8)
    path = tmp_path_factory.mktemp("wide") / "markers.csv"
    ids = [f"v{i}" for i in range(n_varieties)]
    write_markers_csv(path, ids, [f"m{j}" for j in range(n_markers)], dosages)
    return path, ids, dosages


def test_reading_a_wide_csv_keeps_int8_without_a_full_float_copy(wide_csv):
    path, ids, dosages = wide_csv
    cells = dosages.size
    tracemalloc.start()
    try:
        read_ids, matrix = read_genotypes(path)
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read_ids == ids
    assert matrix.dosages.dtype == torch.int8
    assert torch.equal(matrix.dosages, torch.as_tensor(dosages))
    assert retained < 2 * cells  # the int8 matrix, not a float copy
    assert peak < 5 * cells  # well under one float64 copy of the whole matrix (8 x cells)


def test_bad_dosage_in_a_later_block_is_a_data_error(wide_csv, tmp_path):
    path, _, _ = wide_csv
    lines = path.read_text().split("\n")
    cells = lines[1951].split(",")  # variety v1950, past the first block
    cells[8] = "x"  # marker m7
    lines[1951] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        read_genotypes(bad)
    message = str(info.value)
    assert "column 'm7'" in message and "variety 'v1950'" in message and "'x'" in message


def test_missing_genotype_in_a_csv_file(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text("variety,m1,m2\nA,0,1\nB,,2\nC,2,\n")
    with pytest.raises(DataError, match="column 'm1', variety 'B': missing genotype"):
        read_genotypes(path)
    ids, matrix = read_genotypes(path, impute_missing=True)
    assert ids == ["A", "B", "C"] and matrix.n_imputed == 2
    assert matrix.dosages.tolist() == [[0, 1], [MISSING_DOSAGE, 2], [2, MISSING_DOSAGE]]
    assert matrix.standardized().tolist() == [[-1.0, -1.0], [0.0, 1.0], [1.0, 0.0]]


def test_genotype_ids_keep_leading_zeros(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text("variety,m1\n001,0\n01,2\n")
    assert read_genotypes(path)[0] == ["001", "01"]


def test_genotype_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text("variety,m1\nA,0\nB,2\n", encoding="utf-8-sig")
    assert read_genotypes(path)[0] == ["A", "B"]


def test_genotype_ids_are_stripped_like_phenotype_ids(tmp_path):
    phenotypes = tmp_path / "ph.csv"
    phenotypes.write_text("variety,time,value\n A,1,2\nB ,1,3\n")
    markers = tmp_path / "markers.csv"
    markers.write_text("variety,m1\n A,0\nB ,2\n")
    assert load_data(phenotypes, markers=markers).variety_ids == ["A", "B"]


def test_genotype_ids_that_look_like_missing_values_stay_text(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text("variety,m1\nNA,0\nnull,2\nB,1\n")
    assert read_genotypes(path)[0] == ["NA", "null", "B"]


@pytest.mark.parametrize("source", ["csv", "frame"])
def test_empty_genotype_variety_id_is_an_error(tmp_path, source):
    frame = pd.DataFrame({"variety": [None, "B"], "m1": [0, 2]})
    if source == "csv":
        frame.to_csv(tmp_path / "markers.csv", index=False)
        table = tmp_path / "markers.csv"
    else:
        table = frame
    with pytest.raises(DataError, match="variety"):
        read_genotypes(table)
