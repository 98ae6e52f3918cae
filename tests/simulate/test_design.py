"""Tests of the design simulator: shapes, determinism, statistics, files."""

import importlib.metadata

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from pyro_nlme.simulate import (
    CURVE_PARAMETERS,
    SCENARIOS,
    DesignConfig,
    simulate_design,
)
from pyro_nlme.simulate.genotypes import dosage_moments, standardized_product

SMALL = DesignConfig(n_varieties=40, n_heldout=10, n_markers=2_000)


@pytest.fixture(scope="module")
def small():
    return simulate_design(SMALL, seed=11)


def test_default_design_shapes():
    ds = simulate_design()
    assert ds.phenotypes.shape == (250 * 3 * 2 * 21, 5)
    assert ds.dosages.shape == (250, 60_000) and ds.dosages.dtype == np.int8
    assert ds.truth.sizes == {
        "variety": 250,
        "scenario": 3,
        "plant": 2,
        "time": 21,
        "marker": 60_000,
        "curve_parameter": 3,
        "population": 4,
    }
    assert ds.marker_ids[0] == "chr01_000001" and ds.marker_ids[-1].startswith("chr19_")


def test_small_shapes_dtypes_and_ids(small):
    n_total = 50
    ph = small.phenotypes
    assert list(ph.columns) == ["variety", "scenario", "plant", "time", "value"]
    assert len(ph) == 40 * 3 * 2 * 21
    assert ph["time"].dtype == np.float64 and ph["value"].dtype == np.float64
    assert ph["time"].min() == 0 and ph["time"].max() == 20
    assert ph["scenario"].unique().tolist() == list(SCENARIOS)
    assert ph["plant"].nunique() == 40 * 3 * 2
    assert ph["plant"].iloc[0] == "V0001-WW-1" and ph["plant"].iloc[-1] == "V0040-SD-2"
    assert small.variety_ids[0] == "V0001" and small.variety_ids[-1] == "V0050"
    assert small.dosages.shape == (n_total, 2_000) and small.dosages.dtype == np.int8
    table = small.genotype_table()
    assert table.shape == (n_total, 2_001) and list(table.columns[:2]) == [
        "variety",
        "chr01_000001",
    ]
    assert (table.dtypes.iloc[1:] == np.int8).all()
    np.testing.assert_array_equal(small.genotypes.iloc[:, 1:].to_numpy(), small.dosages)

    t = small.truth
    assert list(t["curve_parameter"].values) == list(CURVE_PARAMETERS)
    assert t["individual_parameter"].dims == ("variety", "scenario", "plant", "curve_parameter")
    assert t["noise_free_curve"].dims == ("variety", "scenario", "plant", "time")
    assert t["marker_effect"].dims == ("marker", "curve_parameter")
    assert t["qtl"].dtype == bool and t["heldout"].dtype == bool
    assert t["plant_id"].sel(variety="V0003", scenario="moderate_deficit", plant=2) == "V0003-MD-2"
    assert t.attrs["seed"] == 11 and t.attrs["n_varieties"] == 40
    assert t.attrs["pyro_nlme_version"] == importlib.metadata.version("pyro_nlme")
    np.testing.assert_array_equal(t.attrs["heritability"], SMALL.heritability)


def test_heldout_varieties_have_no_phenotypes(small):
    heldout = small.truth["heldout"]
    assert heldout.sum() == 10 and bool(heldout.sel(variety="V0041"))
    assert not bool(heldout.sel(variety="V0040"))
    assert set(small.phenotypes["variety"]) == set(small.variety_ids[:40])
    assert np.isfinite(small.truth["noise_free_curve"].sel(variety="V0050")).all()


def test_deterministic_and_seed_dependent(small, tmp_path):
    again = simulate_design(SMALL, seed=11)
    pd.testing.assert_frame_equal(small.phenotypes, again.phenotypes)
    np.testing.assert_array_equal(small.dosages, again.dosages)
    xr.testing.assert_identical(small.truth, again.truth)
    first, second = small.write(tmp_path / "a"), again.write(tmp_path / "b")
    for name in ("phenotypes", "markers", "truth"):
        assert first[name].read_bytes() == second[name].read_bytes()
    other = simulate_design(SMALL, seed=12)
    assert not np.array_equal(other.dosages, small.dosages)
    assert not np.allclose(other.truth["genetic_value"], small.truth["genetic_value"])
    assert not other.phenotypes["value"].equals(small.phenotypes["value"])


def test_missing_rate_binomial(small):
    missing = small.phenotypes["value"].isna()
    p, n = SMALL.missing_rate, missing.size
    assert abs(missing.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_genetic_values_and_heritability():
    config = DesignConfig(n_varieties=200, n_markers=2_000)
    ds = simulate_design(config, seed=5)
    t, dosages = ds.truth, ds.dosages
    mean, sd = dosage_moments(dosages)
    g = t["genetic_value"].values
    np.testing.assert_allclose(
        g, standardized_product(dosages, t["marker_effect"].values, mean, sd), atol=1e-10
    )
    np.testing.assert_allclose(g.mean(axis=0), 0.0, atol=1e-10)
    # Rescaled exactly over all simulated varieties.
    np.testing.assert_allclose(g.var(axis=0), np.square(config.genetic_sd), rtol=1e-8)
    # Realised heritability with the sample G x E variance; the delta method gives
    # SD(h2_hat) ~ h2 (1 - h2) sqrt(2 / N).
    vs = t["variety_scenario_effect"].values.reshape(-1, 3)
    h2 = np.asarray(config.heritability)
    realised = g.var(axis=0) / (g.var(axis=0) + np.mean(vs**2, axis=0))
    tolerance = 4 * h2 * (1 - h2) * np.sqrt(2 / vs.shape[0])
    assert (np.abs(realised - h2) < tolerance).all()
    np.testing.assert_allclose(t["heritability"], h2)
    # Plant effects: sample variance with relative SD sqrt(2 / N).
    plant = t["plant_effect"].values.reshape(-1, 3)
    ratio = np.mean(plant**2, axis=0) / np.square(config.plant_sd)
    assert (np.abs(ratio - 1) < 4 * np.sqrt(2 / plant.shape[0])).all()
    # QTL: n_qtl per parameter, n_shared_qtl shared by all three, carrying a sizeable share.
    qtl = t["qtl"].values
    assert (qtl.sum(axis=0) == config.n_qtl).all()
    assert (qtl.all(axis=1)).sum() == config.n_shared_qtl
    share = t["qtl_genetic_value"].values.var(axis=0) / g.var(axis=0)
    assert ((share > 0.1) & (share < 0.8)).all()


def test_individual_parameters_and_curves(small):
    t = small.truth
    phi = t["individual_parameter"]
    expected = (
        t["scenario_mean"] + t["genetic_value"] + t["variety_scenario_effect"] + t["plant_effect"]
    )
    xr.testing.assert_allclose(phi, expected.transpose(*phi.dims))
    asymptote = np.exp(phi.sel(curve_parameter="log_asymptote", drop=True))
    rate = np.exp(phi.sel(curve_parameter="log_rate", drop=True))
    inflection = phi.sel(curve_parameter="inflection", drop=True)
    logistic = asymptote / (1 + np.exp(-rate * (t["time"] - inflection)))
    xr.testing.assert_allclose(
        t["noise_free_curve"], logistic.transpose(*t["noise_free_curve"].dims)
    )


def test_observations_are_curves_with_lognormal_noise(small):
    curve = small.truth["noise_free_curve"].values[:40].ravel()
    value = small.phenotypes["value"].to_numpy()
    observed = np.isfinite(value)
    residual = np.log(value[observed] / curve[observed])
    n = residual.size
    noise_sd = SMALL.noise_sd
    assert abs(residual.mean()) < 4 * noise_sd / np.sqrt(n)
    assert abs(residual.std() / noise_sd - 1) < 4 * np.sqrt(1 / (2 * n))


def test_written_files_round_trip(small, tmp_path):
    paths = small.write(tmp_path)
    assert set(paths) == {"phenotypes", "markers", "truth"}
    phenotypes = pd.read_csv(paths["phenotypes"])
    pd.testing.assert_frame_equal(phenotypes, small.phenotypes)
    header = paths["phenotypes"].read_text().splitlines()
    assert header[0] == "variety,scenario,plant,time,value"
    assert any(line.endswith(",") for line in header[1:])  # missing images: empty value
    markers = pd.read_csv(paths["markers"])
    assert list(markers.columns) == ["variety", *small.marker_ids]
    assert markers["variety"].tolist() == small.variety_ids
    np.testing.assert_array_equal(markers.iloc[:, 1:].to_numpy(), small.dosages)
    truth = xr.open_dataset(paths["truth"], engine="h5netcdf").load()
    xr.testing.assert_equal(truth, small.truth)
    assert truth.attrs["seed"] == 11


def test_parquet_markers_round_trip(small, tmp_path):
    path = small.write(tmp_path, marker_format="parquet")["markers"]
    assert path.name == "markers.parquet"
    markers = pd.read_parquet(path)
    assert markers["variety"].tolist() == small.variety_ids
    assert (markers.dtypes.iloc[1:] == np.int8).all()
    np.testing.assert_array_equal(markers.iloc[:, 1:].to_numpy(), small.dosages)
    with pytest.raises(ValueError):
        small.write(tmp_path, marker_format="hdf5")


@pytest.mark.parametrize(
    "change",
    [
        {"missing_rate": 1.0},
        {"heritability": (0.0, 0.5, 0.5)},
        {"genetic_sd": (0.1, 0.1)},
        {"n_shared_qtl": 11},
        {"n_qtl": 0},
        {"fst": 0.0},
    ],
)
def test_config_validation(change):
    with pytest.raises(ValueError):
        DesignConfig(**change)
