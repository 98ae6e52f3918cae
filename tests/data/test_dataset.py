"""NLMEData: the dense masked grid, the summary, input formats and the views engines use."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_nlme.data import NLMEData, load_data
from pyro_nlme.data.dataset import DEFAULT_SCENARIO


def assert_same_data(a: NLMEData, b: NLMEData) -> None:
    for field in ("times", "values", "mask", "plant_mask", "variety_index", "covariate_design"):
        left, right = getattr(a, field), getattr(b, field)
        assert left.dtype == right.dtype, field
        assert torch.equal(left, right), field
    assert a.variety_ids == b.variety_ids
    assert a.scenario_names == b.scenario_names
    assert a.covariate_names == b.covariate_names
    np.testing.assert_array_equal(a.plant_ids, b.plant_ids)
    assert (a.markers is None) == (b.markers is None)
    if a.markers is not None:
        assert torch.equal(a.markers.dosages, b.markers.dosages)
        assert a.markers.marker_ids == b.markers.marker_ids
    summary_a = {k: v for k, v in a.summary.as_dict().items() if k != "source"}
    summary_b = {k: v for k, v in b.summary.as_dict().items() if k != "source"}
    assert summary_a == summary_b


def test_ragged_design_is_padded_masked_and_time_sorted(ragged_frame):
    data = load_data(ragged_frame)
    assert data.variety_ids == ["B", "A"]  # order of first appearance
    assert data.scenario_names == ["s", "t"]
    assert tuple(data.times.shape) == (2, 2, 2, 2)
    assert data.times.dtype == torch.float32 and data.mask.dtype == torch.bool
    # B/s/b1 was given at times 5 then 1: slots sorted by time.
    assert data.times[0, 0, 0].tolist() == [1.0, 5.0]
    assert data.values[0, 0, 0].tolist() == [2.0, 1.0]
    assert data.times[0, 0, 1].tolist() == [7.0, 0.0]
    assert data.mask[0, 0, 1].tolist() == [True, False]
    # A/s/a1's only value is missing: the plant exists but nothing is observed.
    assert data.plant_ids[1, 0].tolist() == ["a1", "a2"]
    assert data.mask[1, 0, 0].tolist() == [False, False]
    assert data.times[1, 0, 0, 0] == 3.0
    assert data.plant_ids[1, 1].tolist() == ["a3", ""]
    assert data.plant_mask.tolist() == [
        [[True, True], [False, False]],
        [[True, True], [True, False]],
    ]
    assert data.variety_scenario_mask.tolist() == [[True, False], [True, True]]
    assert int(data.mask.sum()) == 5
    assert data.values[~data.mask].eq(0).all()


def test_summary_counts(ragged_frame):
    summary = load_data(ragged_frame).summary
    expected = dict(
        source="DataFrame",
        n_rows=6,
        n_varieties_phenotyped=2,
        n_varieties_genotyped_only=0,
        n_scenarios=2,
        n_plants=5,
        n_distinct_times=5,
        n_time_slots=2,
        n_observed=5,
        n_missing_values=1,
        n_removed_rows=0,
        n_markers=0,
        n_imputed_genotypes=0,
        n_monomorphic_markers=0,
        n_covariates=0,
        time_min=1.0,
        time_max=7.0,
        value_min=1.0,
        value_max=6.0,
        n_left_censored=0,
        n_right_censored=0,
        n_interval_censored=0,
    )
    assert summary.as_dict() == expected
    text = str(summary)
    assert "missing values (masked)       1" in text
    assert "removed rows                  0" in text


def test_summary_counts_genotyped_only_varieties_are_kept(ragged_frame):
    markers = pd.DataFrame(
        {"variety": ["A", "C", "B", "D"], "m1": [0, 1, 2, 1], "m2": [1, 1, 1, 1]}
    )
    data = load_data(ragged_frame, markers=markers)
    assert data.variety_ids == ["A", "C", "B", "D"]  # genotype table order
    assert data.summary.n_varieties_phenotyped == 2
    assert data.summary.n_varieties_genotyped_only == 2
    assert data.summary.n_markers == 2
    assert data.summary.n_monomorphic_markers == 1
    assert data.phenotyped.tolist() == [True, False, True, False]
    assert not data.plant_mask[1].any() and not data.plant_mask[3].any()
    assert data.times.shape[0] == 4 and data.markers.n_varieties == 4
    # Each variety's phenotypes and genotypes stay aligned by id.
    assert data.times[2, 0, 0].tolist() == [1.0, 5.0]
    assert data.markers.dosages[:, 0].tolist() == [0, 1, 2, 1]


def test_csv_parquet_and_dataframe_give_identical_data(tmp_path, ragged_frame):
    frame = ragged_frame.assign(soil=["x", "x", "y", "y", "y", "x"])
    markers = pd.DataFrame({"variety": ["A", "B"], "m1": [0, 2], "m2": [1, 1]})
    frame.to_csv(tmp_path / "ph.csv", index=False)
    frame.to_parquet(tmp_path / "ph.parquet")
    markers.to_parquet(tmp_path / "g.parquet")
    options = dict(covariate_columns=["soil"])
    reference = load_data(frame, markers=markers, **options)
    for source in (tmp_path / "ph.csv", str(tmp_path / "ph.parquet")):
        assert_same_data(load_data(source, markers=markers, **options), reference)
    assert reference.covariate_names == ["soil[y]"]
    assert reference.covariate_design[:, 0].tolist() == [1.0, 0.0]  # A: y, B: x


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_genotype_files_give_identical_data(tmp_path, ragged_frame, suffix):
    markers = pd.DataFrame({"variety": ["A", "B"], "m1": [0, 2], "m2": [1, np.nan]})
    path = tmp_path / f"g.{suffix}"
    markers.to_csv(path, index=False) if suffix == "csv" else markers.to_parquet(path)
    options = dict(impute_missing_markers=True)
    assert_same_data(
        load_data(ragged_frame, markers=path, **options),
        load_data(ragged_frame, markers=markers, **options),
    )


def test_ids_are_text_and_keep_leading_zeros(write_csv):
    data = load_data(write_csv("ids.csv", "variety,time,value\n001,1,2\n01,1,3\n"))
    assert data.variety_ids == ["001", "01"]


def test_absent_scenario_and_plant_columns(write_csv):
    data = load_data(write_csv("min.csv", "variety,time,value\nA,2,1\nA,1,0.5\nB,1,3\n"))
    assert data.scenario_names == [DEFAULT_SCENARIO]
    assert tuple(data.times.shape) == (2, 1, 1, 2)
    assert data.summary.n_plants == 2
    assert data.times[0, 0, 0].tolist() == [1.0, 2.0]


def test_columns_mapping_renames(write_csv):
    path = write_csv("tree.csv", "Tree,age,circumference\n1,118,30\n1,484,58\n2,118,33\n")
    data = load_data(path, columns="variety=Tree, time=age ,value=circumference")
    assert data.variety_ids == ["1", "2"]
    assert data.values[0, 0, 0].tolist() == [30.0, 58.0]
    mapped = load_data(path, columns={"variety": "Tree", "time": "age", "value": "circumference"})
    assert_same_data(mapped, data)


def test_covariates_from_a_separate_table(write_csv, ragged_frame):
    covariates = pd.DataFrame({"variety": ["A", "B"], "height": [1.5, 2.5], "soil": ["y", "x"]})
    data = load_data(ragged_frame, covariates=covariates, covariate_columns=["height", "soil"])
    assert data.covariate_names == ["height", "soil[y]"]
    assert data.covariate_design.tolist() == [[2.5, 0.0], [1.5, 1.0]]  # rows B, A


def test_subset_keeps_positions_labels_and_markers(ragged_frame):
    markers = pd.DataFrame({"variety": ["A", "C", "B"], "m1": [0, 1, 2]})
    data = load_data(ragged_frame, markers=markers)
    batch = data.subset(torch.tensor([2, 0]))
    assert batch.variety_ids == ["B", "A"]
    assert batch.variety_index.tolist() == [2, 0]
    assert torch.equal(batch.times, data.times[[2, 0]])
    assert torch.equal(batch.values, data.values[[2, 0]])
    assert torch.equal(batch.mask, data.mask[[2, 0]])
    assert torch.equal(batch.plant_mask, data.plant_mask[[2, 0]])
    np.testing.assert_array_equal(batch.plant_ids, data.plant_ids[[2, 0]])
    # Minibatch standardisation uses the full data's moments.
    assert torch.equal(batch.standardized_markers(), data.standardized_markers()[[2, 0]])
    assert batch.summary == data.summary
    assert batch.scenario_names == data.scenario_names


def test_without_values_and_with_values(ragged_frame):
    data = load_data(ragged_frame)
    bare = data.without_values()
    assert bare.values is None and data.values is not None
    assert torch.equal(bare.mask, data.mask)
    assert bare.subset([1]).values is None
    assert "value" not in bare.observation_frame()
    again = bare.with_values(data.values.double())
    assert again.values.dtype == torch.float32
    assert torch.equal(again.values, data.values)


def test_observation_frame_lists_observed_cells_in_grid_order(ragged_frame):
    frame = load_data(ragged_frame).observation_frame()
    expected = pd.DataFrame(
        {
            "variety": ["B", "B", "B", "A", "A"],
            "scenario": ["s", "s", "s", "s", "t"],
            "plant": ["b1", "b1", "b2", "a2", "a3"],
            "time": np.array([1.0, 5.0, 7.0, 2.0, 1.0], np.float32),
            "value": np.array([2.0, 1.0, 6.0, 4.0, 5.0], np.float32),
        }
    )
    assert list(frame.columns) == list(expected.columns)
    for column in ("variety", "scenario", "plant"):
        assert frame[column].tolist() == expected[column].tolist()
    np.testing.assert_array_equal(frame["time"].to_numpy(), expected["time"].to_numpy())
    np.testing.assert_array_equal(frame["value"].to_numpy(), expected["value"].to_numpy())
    observed = ragged_frame.dropna(subset=["value"])
    assert len(frame) == len(observed)


def test_to_cpu_and_dtype(ragged_frame):
    markers = pd.DataFrame({"variety": ["A", "B"], "m1": [0, 2]})
    data = load_data(ragged_frame, markers=markers, dtype=torch.float64)
    moved = data.to("cpu")
    assert moved.device == torch.device("cpu")
    assert moved.times.dtype == torch.float64
    assert moved.markers.dosages.dtype == torch.int8
    assert_same_data(moved, data)


def test_numeric_ids_and_integer_columns_load_the_same_from_every_format(tmp_path):
    """Orange has integer tree ids, ages and circumferences: Parquet keeps them as integers,
    the CSV reader as text; both give the DataFrame's data."""
    from pyro_nlme.data.bundled import bundled_path

    frame = pd.read_csv(bundled_path("Orange.csv"))
    assert pd.api.types.is_integer_dtype(frame["Tree"])
    frame.to_parquet(tmp_path / "orange.parquet")
    columns = "variety=Tree,time=age,value=circumference"
    reference = load_data(frame, columns=columns)
    assert reference.variety_ids == ["1", "2", "3", "4", "5"]
    for source in (bundled_path("Orange.csv"), tmp_path / "orange.parquet"):
        assert_same_data(load_data(source, columns=columns), reference)
