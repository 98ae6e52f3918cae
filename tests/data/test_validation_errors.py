"""Every bad phenotype, genotype or covariate input gives a DataError naming the file, column,
row (CSV line, header = line 1) and id at fault."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from pyro_nlme.data import DataError, load_data, read_genotypes

HEADER = "variety,scenario,plant,time,value\n"


def error_of(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_data(*args, **kwargs)
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_required_column(write_csv):
    path = write_csv("no_value.csv", "variety,time\nA,1\n")
    assert_names(error_of(path), "no_value.csv", "missing required column", "'value'")


def test_duplicated_column_names_in_csv_header(write_csv):
    path = write_csv("dup.csv", "variety,time,value,time\nA,1,2,3\n")
    assert_names(error_of(path), "dup.csv", "duplicated column", "'time'")


def test_duplicated_column_names_in_dataframe():
    frame = pd.DataFrame([["A", 1, 2, 3]], columns=["variety", "time", "value", "time"])
    assert_names(error_of(frame), "DataFrame", "duplicated column", "'time'")


@pytest.mark.parametrize(
    "column, line, bad",
    [("time", "A,s,p1,x,3\n", "'x'"), ("value", "A,s,p1,2,abc\n", "'abc'")],
)
def test_non_numeric_cell_names_file_column_line(write_csv, column, line, bad):
    path = write_csv("bad.csv", HEADER + "A,s,p1,1,2\n" + line)
    message = error_of(path)
    assert_names(message, "bad.csv", f"column {column!r}", "non-numeric", "line 3", bad)


def test_empty_time_names_file_column_line(write_csv):
    path = write_csv("empty_time.csv", HEADER + "A,s,p1,1,2\nB,s,p2,,3\n")
    assert_names(error_of(path), "empty_time.csv", "column 'time'", "empty", "line 3")


@pytest.mark.parametrize(
    "line", ["Vx,s,p1,x,3\n", "Vx,s,p1,2,abc\n", "Vx,s,p1,,3\n"], ids=["time", "value", "empty"]
)
def test_bad_numeric_cell_names_the_variety_id(write_csv, line):
    path = write_csv("bad.csv", HEADER + "A,s,p0,1,2\n" + line)
    assert_names(error_of(path), "'Vx'")


def test_non_numeric_value_in_dataframe_names_index_label():
    frame = pd.DataFrame(
        {"variety": ["A", "A"], "time": [1, 2], "value": ["1.5", "oops"]}, index=[10, 11]
    )
    assert_names(error_of(frame), "DataFrame", "column 'value'", "row 11", "'oops'")


def test_empty_value_is_a_masked_missing_image_never_imputed(write_csv):
    path = write_csv("missing.csv", HEADER + "A,s,p1,1,2\nA,s,p1,2,\nA,s,p1,3,4\n")
    data = load_data(path)
    assert data.summary.n_missing_values == 1
    assert data.summary.n_observed == 2
    assert data.summary.n_rows == 3
    assert data.summary.n_removed_rows == 0
    assert data.mask[0, 0, 0].tolist() == [True, False, True]
    assert data.times[0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert data.values[0, 0, 0, 1] == 0.0  # a placeholder, not an imputed value
    assert data.summary.value_min == 2.0 and data.summary.value_max == 4.0


def test_duplicated_measurement_rows(write_csv):
    path = write_csv("dups.csv", HEADER + "A,s,p1,1,2\nB,s,p2,1,3\nA,s,p1,1,4\n")
    message = error_of(path)
    assert_names(message, "dups.csv", "'A'", "'p1'", "line 2", "line 4")
    assert "line 3" not in message


def test_duplicated_measurement_rows_without_plant_column(write_csv):
    path = write_csv("dups.csv", "variety,time,value\nA,1,2\nA,2,3\nA,1,4\n")
    assert_names(error_of(path), "dups.csv", "'A'", "line 2", "line 4")


@pytest.mark.parametrize(
    "rows, pair",
    [("A,s,p1,1,2\nB,s,p1,2,3\n", "['B', 's']"), ("A,s,p1,1,2\nA,t,p1,2,3\n", "['A', 't']")],
    ids=["two_varieties", "two_scenarios"],
)
def test_plant_id_reused(write_csv, rows, pair):
    path = write_csv("reuse.csv", HEADER + rows)
    message = error_of(path)
    assert_names(message, "reuse.csv", "column 'plant'", "'p1'", pair, "line 2", "line 3")


def test_empty_variety_id(write_csv):
    path = write_csv("ids.csv", HEADER + "A,s,p1,1,2\n,s,p2,2,3\n")
    assert_names(error_of(path), "ids.csv", "column 'variety'", "empty id", "line 3")


def test_columns_mapping_to_absent_column(write_csv):
    path = write_csv("tree.csv", "Tree,age,circumference\n1,118,30\n")
    message = error_of(path, columns="variety=Tree,time=days,value=circumference")
    assert_names(message, "tree.csv", "--columns", "time=days")


def test_columns_mapping_unknown_canonical_name(write_csv):
    path = write_csv("tree.csv", "Tree,age,circumference\n1,118,30\n")
    assert_names(error_of(path, columns="variety=Tree,age=age"), "unknown canonical", "'age'")


def test_columns_mapping_malformed_item(write_csv):
    path = write_csv("tree.csv", "Tree,age,circumference\n1,118,30\n")
    assert_names(error_of(path, columns="variety"), "--columns", "'variety'")


def test_covariate_varying_within_variety(write_csv):
    path = write_csv(
        "cov.csv",
        "variety,plant,time,value,soil\nA,a,1,2,x\nB,b,1,3,x\nA,a,2,3,y\n",
    )
    message = error_of(path, covariate_columns=["soil"])
    assert_names(message, "cov.csv", "column 'soil'", "'A'", "line 2", "line 4")


def test_covariate_absent_everywhere(write_csv):
    path = write_csv("cov.csv", "variety,time,value\nA,1,2\n")
    assert_names(error_of(path, covariate_columns=["soil"]), "'soil'", "cov.csv")


# --- genotypes -------------------------------------------------------------------------------

PHENOTYPES = HEADER + "A,s,a,1,2\nB,s,b,1,3\nC,s,c,1,4\n"


def genotype_error(write_csv, markers: pd.DataFrame, **kwargs) -> str:
    return error_of(write_csv("ph.csv", PHENOTYPES), markers=markers, **kwargs)


def test_phenotyped_varieties_absent_from_genotypes_are_listed(write_csv):
    markers = pd.DataFrame({"variety": ["A", "Z"], "m1": [0, 1]})
    message = genotype_error(write_csv, markers)
    assert_names(message, "ph.csv", "absent", "['B', 'C']", "DataFrame")


@pytest.mark.parametrize("bad", [3, -1, 0.5])
def test_dosage_outside_0_1_2_names_marker_and_variety(write_csv, bad):
    markers = pd.DataFrame({"variety": ["A", "B", "C"], "m1": [0, 1, 1], "m2": [0, bad, 2]})
    message = genotype_error(write_csv, markers)
    assert_names(message, "column 'm2'", "variety 'B'", "outside {0, 1, 2}")


def test_non_numeric_dosage_names_marker_and_variety(write_csv):
    markers = pd.DataFrame({"variety": ["A", "B", "C"], "m1": ["0", "1", "AA"]})
    assert_names(genotype_error(write_csv, markers), "column 'm1'", "variety 'C'", "'AA'")


def test_missing_genotype_is_an_error_by_default(write_csv):
    markers = pd.DataFrame({"variety": ["A", "B", "C"], "m1": [0, np.nan, 1], "m2": [0, 1, 2]})
    message = genotype_error(write_csv, markers)
    assert_names(message, "column 'm1'", "variety 'B'", "missing genotype", "impute")


def test_missing_genotype_imputed_on_request(write_csv):
    markers = pd.DataFrame(
        {"variety": ["A", "B", "C"], "m1": [0, np.nan, 2], "m2": [np.nan, 1, np.nan]}
    )
    data = load_data(write_csv("ph.csv", PHENOTYPES), markers=markers, impute_missing_markers=True)
    assert data.summary.n_imputed_genotypes == 3
    z = data.standardized_markers()
    assert z[1, 0] == 0.0 and z[0, 1] == 0.0 and z[2, 1] == 0.0
    assert z[0, 0] == pytest.approx(-1.0) and z[2, 0] == pytest.approx(1.0)


def test_duplicated_variety_in_genotypes(write_csv):
    markers = pd.DataFrame({"variety": ["A", "B", "C", "B"], "m1": [0, 1, 2, 1]})
    assert_names(genotype_error(write_csv, markers), "duplicated variety", "'B'")


def test_genotype_table_first_column_must_be_variety():
    with pytest.raises(DataError, match=re.escape("first column must be 'variety'")):
        read_genotypes(pd.DataFrame({"m1": [0], "variety": ["A"]}))


def test_dosage_error_in_a_csv_file_names_the_file(write_csv):
    path = write_csv("markers.csv", "variety,m1,m2\nA,0,1\nB,2,7\n")
    with pytest.raises(DataError) as info:
        read_genotypes(path)
    assert_names(str(info.value), "markers.csv", "column 'm2'", "variety 'B'", "7")


def test_infinite_value(write_csv):
    path = write_csv("inf.csv", "variety,time,value\nA,1,2\nA,2,inf\n")
    assert_names(error_of(path), "inf.csv", "column 'value'", "infinite", "line 3")


@pytest.mark.parametrize("text, expected", [(None, "does not exist"), ("", "is empty")])
def test_missing_or_empty_file(tmp_path, text, expected):
    path = tmp_path / "ph.csv"
    if text is not None:
        path.write_text(text)
    assert_names(error_of(path), "ph.csv", expected)


def test_covariate_empty_or_missing_for_a_variety():
    frame = pd.DataFrame({"variety": ["A", "B"], "time": [1, 1], "value": [1, 2]})
    message = error_of(frame.assign(soil=["x", None]), covariate_columns=["soil"])
    assert_names(message, "column 'soil'", "empty covariate", "row 1")
    covariates = pd.DataFrame({"variety": ["A"], "height": [1.0]})
    message = error_of(frame, covariates=covariates, covariate_columns=["height"])
    assert_names(message, "column 'height'", "no value for variety", "['B']")


def test_columns_mapping_onto_an_existing_canonical_column(write_csv):
    path = write_csv("two.csv", "variety,Tree,time,value\nA,1,1,2\n")
    message = error_of(path, columns="variety=Tree")
    assert_names(message, "two.csv", "after --columns mapping", "duplicated", "'variety'")


def test_na_is_not_a_missing_value_in_the_phenotypes(write_csv):
    """Only an empty cell is a missing image; 'NA' is refused, not silently masked."""
    path = write_csv("na.csv", "variety,time,value\nA,1,2\nB,1,NA\n")
    assert_names(error_of(path), "na.csv", "column 'value'", "non-numeric", "line 3", "'NA'")
