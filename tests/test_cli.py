"""The command line: check, simulate, prior, fit (with a model given by path), predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import arviz as az
import pytest

from pyro_nlme.cli import main

USER_MODEL = Path(__file__).parent / "model" / "user_gompertz_model.py"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert (
        main(
            [
                "simulate",
                "--out",
                str(out),
                "--varieties",
                "10",
                "--heldout",
                "2",
                "--markers",
                "50",
                "--days",
                "8",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    return out


def test_check_prints_the_summary(simulated, capsys):
    assert (
        main(
            [
                "check",
                "--phenotypes",
                str(simulated / "phenotypes.csv"),
                "--markers",
                str(simulated / "markers.csv"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "varieties genotyped only      2 (kept)" in out
        and "markers                       50" in out
    )


def test_check_fails_with_a_named_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("variety,time,value\nA,1,2\nA,x,3\n")
    assert main(["check", "--phenotypes", str(bad)]) == 2
    assert "column 'time'" in capsys.readouterr().err


def test_prior_summary(simulated, capsys):
    assert (
        main(
            [
                "prior",
                "--phenotypes",
                str(simulated / "phenotypes.csv"),
                "--markers",
                str(simulated / "markers.csv"),
                "--draws",
                "20",
            ]
        )
        == 0
    )
    assert "prior_q95" in capsys.readouterr().out


def test_fit_a_model_given_by_path_then_predict(simulated, tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    shutil.copy(USER_MODEL, model_file)
    fit = tmp_path / "fit.nc"
    assert (
        main(
            [
                "fit",
                "--phenotypes",
                str(simulated / "phenotypes.csv"),
                "--model",
                f"{model_file}:gompertz",
                "--method",
                "svi",
                "--guide",
                "normal",
                "--batch-size",
                "4",
                "--max-steps",
                "20",
                "--draws",
                "5",
                "--no-progress",
                "--out",
                str(fit),
            ]
        )
        == 0
    )
    assert az.from_netcdf(str(fit)).posterior.attrs["model"] == f"{model_file}:gompertz"
    marker_fit = tmp_path / "g2was.nc"
    assert (
        main(
            [
                "fit",
                "--phenotypes",
                str(simulated / "phenotypes.csv"),
                "--markers",
                str(simulated / "markers.csv"),
                "--batch-size",
                "4",
                "--max-steps",
                "20",
                "--min-steps",
                "6000",
                "--parametrization",
                "centred",
                "--correlated-events",
                "--correlated-plates",
                "plant",
                "--exact-levels",
                "variety_scenario_parameter",
                "--variety-offsets",
                "--draws",
                "5",
                "--no-progress",
                "--out",
                str(marker_fit),
            ]
        )
        == 0
    )
    settings = json.loads(az.from_netcdf(str(marker_fit)).posterior.attrs["settings"])
    assert settings["correlated_events"] is True
    assert settings["correlated_plates"] == ["plant"]
    assert settings["exact_levels"] == ["variety_scenario_parameter"]
    assert settings["stopping"]["min_steps"] == 6000
    assert settings["variety_offsets"] is True
    assert "scenario_mean[well_watered, log_asymptote]" in capsys.readouterr().out
    prediction = tmp_path / "prediction.nc"
    assert (
        main(
            [
                "predict",
                "--fit",
                str(marker_fit),
                "--markers",
                str(simulated / "markers.csv"),
                "--out",
                str(prediction),
            ]
        )
        == 0
    )
    assert az.from_netcdf(str(prediction)).posterior["curve"].sizes["variety"] == 12
