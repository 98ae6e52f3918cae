"""Shared fixtures: small tables written to CSV, the bundled data sets, a small simulated design,
and a clean Pyro state for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pytest


@pytest.fixture(autouse=True)
def clean_pyro():
    """Fresh parameter store and a fixed seed in every test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def write_csv(tmp_path: Path):
    """``write_csv(name, text)`` writes ``text`` verbatim under ``tmp_path`` and returns the path
    as a string (rows keep the line numbers they have in ``text``: header = line 1)."""

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def ragged_frame() -> pd.DataFrame:
    """A ragged long table: variety B has 2 plants in one scenario, A has plants in two
    scenarios with different numbers of times; rows out of time order; one missing value."""
    return pd.DataFrame(
        {
            "variety": ["B", "B", "A", "A", "A", "B"],
            "scenario": ["s", "s", "s", "s", "t", "s"],
            "plant": ["b1", "b1", "a1", "a2", "a3", "b2"],
            "time": [5.0, 1.0, 3.0, 2.0, 1.0, 7.0],
            "value": [1.0, 2.0, np.nan, 4.0, 5.0, 6.0],
        }
    )


@pytest.fixture(scope="session")
def orange_data():
    from pyro_nlme.data import load_orange

    return load_orange()


@pytest.fixture(scope="session")
def soybean_data():
    from pyro_nlme.data import load_soybean

    return load_soybean()


@pytest.fixture(scope="session")
def simulated_design():
    """The simulator's small design: 30 varieties x 3 scenarios x 2 plants x 21 days, 500
    markers (about 2 s, once per session)."""
    from pyro_nlme.simulate import DesignConfig, simulate_design

    return simulate_design(DesignConfig(n_varieties=30, n_markers=500), seed=0)


@pytest.fixture(scope="session")
def simulated_data(simulated_design):
    """The simulated design loaded through ``load_data`` (phenotypes and markers as
    DataFrames)."""
    from pyro_nlme.data import load_data

    return load_data(simulated_design.phenotypes, markers=simulated_design.genotype_table())
