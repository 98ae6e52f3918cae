"""The bundled public data sets load with the documented shapes, counts and covariates."""

from __future__ import annotations

import pandas as pd
import torch

from pyro_nlme.data.bundled import bundled_path


def test_orange(orange_data):
    data = orange_data
    assert tuple(data.times.shape) == (5, 1, 1, 7)
    assert data.variety_ids == ["1", "2", "3", "4", "5"]
    assert bool(data.mask.all())
    assert data.summary.n_rows == 35 and data.summary.n_observed == 35
    assert data.summary.n_missing_values == 0 and data.summary.n_removed_rows == 0
    assert (data.summary.time_min, data.summary.time_max) == (118.0, 1582.0)
    assert (data.summary.value_min, data.summary.value_max) == (30.0, 214.0)
    assert data.times[0, 0, 0].tolist() == [118, 484, 664, 1004, 1231, 1372, 1582]
    assert data.values[0, 0, 0, :3].tolist() == [30.0, 58.0, 87.0]
    assert data.markers is None and data.covariate_names == []


def test_soybean(soybean_data):
    data = soybean_data
    raw = pd.read_csv(bundled_path("Soybean.csv"), dtype={"Plot": str})
    assert tuple(data.times.shape) == (48, 1, 1, 10)
    assert data.summary.n_rows == 412 == int(data.mask.sum())
    assert data.summary.n_varieties_phenotyped == 48
    assert data.covariate_names == ["Variety[P]", "Year[1989]", "Year[1990]"]
    design = pd.DataFrame(data.covariate_design.numpy(), columns=data.covariate_names)
    plots = raw.drop_duplicates("Plot").set_index("Plot").loc[data.variety_ids]
    assert design["Variety[P]"].tolist() == (plots["Variety"] == "P").astype(float).tolist()
    assert design["Year[1989]"].tolist() == (plots["Year"] == 1989).astype(float).tolist()
    assert design["Year[1990]"].tolist() == (plots["Year"] == 1990).astype(float).tolist()
    assert design.sum().tolist() == [24.0, 16.0, 16.0]
    # Plots measured 8, 9 or 10 times: padded, masked.
    counts = data.mask.flatten(1).sum(1)
    assert sorted(set(counts.tolist())) == [8, 9, 10]
    first = raw[raw["Plot"] == data.variety_ids[0]]
    n = len(first)
    assert data.times[0, 0, 0, :n].tolist() == first["Time"].astype(float).tolist()
    torch.testing.assert_close(
        data.values[0, 0, 0, :n], torch.tensor(first["weight"].to_numpy(), dtype=torch.float32)
    )
