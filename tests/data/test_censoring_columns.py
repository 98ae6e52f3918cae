"""The censoring (``cens``, ``limit``) and ``trials`` columns: read onto the grid, carried by
``subset``, ``to``, ``without_values``, counted in the summary, and every bad cell named."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_nlme.data import DataError, load_data

HEADER = "variety,plant,time,value,cens,limit\n"
CENSORED = (
    HEADER + "A,a1,1,0.5,1,\n"  # left-censored below 0.5 (line 2)
    "A,a1,2,3.0,0,\n"
    "A,a1,3,8.0,-1,\n"  # right-censored above 8 (line 4)
    "B,b1,1,0.5,1,0.1\n"  # in [0.1, 0.5] (line 5)
    "B,b1,2,,0,\n"  # missing image
    "B,b1,3,6.0,-1,9.0\n"  # in [6, 9] (line 7)
)


def error_of(path: str) -> str:
    with pytest.raises(DataError) as info:
        load_data(path)
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_censoring_read_onto_the_grid(write_csv):
    data = load_data(write_csv("cens.csv", CENSORED))
    censoring = data.censoring
    assert censoring.code[:, 0, 0].tolist() == [[1, 0, -1], [1, 0, -1]]
    inf = math.inf
    expected_lower = torch.tensor([[-inf, -inf, 8.0], [0.1, -inf, 6.0]])
    assert torch.equal(censoring.lower[:, 0, 0], expected_lower)
    assert torch.equal(censoring.upper[:, 0, 0], torch.tensor([[0.5, inf, inf], [0.5, inf, 9.0]]))
    assert data.mask[1, 0, 0].tolist() == [True, False, True]  # censored values are observed
    summary = data.summary
    assert (summary.n_left_censored, summary.n_right_censored) == (1, 1)
    assert summary.n_interval_censored == 2
    assert summary.n_observed == 5
    assert "interval-censored values      2" in str(summary)


def test_censoring_carried_by_subset_to_and_without_values(write_csv):
    data = load_data(write_csv("cens.csv", CENSORED))
    sub = data.subset([1])
    assert sub.censoring.code.tolist() == data.censoring.code[[1]].tolist()
    assert torch.equal(sub.censoring.lower, data.censoring.lower[[1]])
    moved = data.to("cpu").without_values()
    assert moved.values is None
    assert torch.equal(moved.censoring.upper, data.censoring.upper)


def test_no_censoring_columns_means_none(write_csv):
    data = load_data(write_csv("plain.csv", "variety,time,value\nA,1,2\n"))
    assert data.censoring is None and data.trials is None
    assert data.summary.n_left_censored == 0


def test_mapped_censoring_columns(write_csv):
    path = write_csv("mapped.csv", "id,t,y,CENS,LOQ\nA,1,0.5,1,\nA,2,2,0,\n")
    data = load_data(path, columns="variety=id,time=t,value=y,cens=CENS,limit=LOQ")
    assert data.censoring.code[0, 0, 0].tolist() == [1, 0]


@pytest.mark.parametrize(
    "line, parts",
    [
        ("A,a1,2,3.0,2,\n", ["column 'cens'", "not in {-1, 0, 1}", "line 3", "'A'", "'2'"]),
        ("A,a1,2,3.0,,\n", ["column 'cens'", "empty censoring code", "line 3"]),
        ("A,a1,2,,1,\n", ["column 'value'", "without a value", "line 3"]),
        ("A,a1,2,3.0,0,1.0\n", ["column 'limit'", "uncensored", "line 3", "'A'"]),
        ("A,a1,2,3.0,1,4.0\n", ["column 'limit'", "wrong side", "line 3", "'4.0'"]),
        ("A,a1,2,3.0,-1,2.0\n", ["column 'limit'", "wrong side", "line 3", "'2.0'"]),
        ("A,a1,2,3.0,1,x\n", ["column 'limit'", "non-numeric", "line 3", "'x'"]),
    ],
    ids=["code", "empty-code", "no-value", "limit-uncensored", "left-limit", "right-limit", "text"],
)
def test_bad_censoring_cell_is_named(write_csv, line, parts):
    path = write_csv("bad.csv", HEADER + "A,a1,1,0.5,1,\n" + line)
    assert_names(error_of(path), "bad.csv", *parts)


def test_limit_without_cens_column(write_csv):
    path = write_csv("limit.csv", "variety,time,value,limit\nA,1,2,1\n")
    assert_names(error_of(path), "limit.csv", "column 'limit'", "needs a cens column")


TRIALS = "variety,time,value,trials\nA,1,0,5\nA,2,3,5\nA,3,,\nB,1,1,1\n"


def test_trials_read_onto_the_grid(write_csv):
    data = load_data(write_csv("trials.csv", TRIALS))
    assert data.trials.tolist() == [[[[5, 5, 1]]], [[[1, 1, 1]]]]
    assert data.subset([1]).trials.tolist() == [[[[1, 1, 1]]]]
    assert data.without_values().trials is data.trials


@pytest.mark.parametrize(
    "line, parts",
    [
        ("B,2,1,0\n", ["column 'trials'", "not a positive integer", "line 6", "'B'", "'0'"]),
        ("B,2,1,2.5\n", ["column 'trials'", "not a positive integer", "line 6", "'2.5'"]),
        ("B,2,1,\n", ["column 'trials'", "not a positive integer", "line 6"]),
        ("B,2,3,2\n", ["column 'value'", "0 .. trials", "line 6", "'B'", "'3'"]),
        ("B,2,0.5,2\n", ["column 'value'", "0 .. trials", "line 6", "'0.5'"]),
        ("B,2,-1,2\n", ["column 'value'", "0 .. trials", "line 6", "'-1'"]),
    ],
    ids=["zero", "fraction", "empty", "above", "non-integer", "negative"],
)
def test_bad_trials_cell_is_named(write_csv, line, parts):
    path = write_csv("bad_trials.csv", TRIALS + line)
    assert_names(error_of(path), "bad_trials.csv", *parts)
