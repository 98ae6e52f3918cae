"""Public NLME data sets bundled with the package (provenance in SOURCES.md beside this file)."""

from importlib.resources import files

from pyro_nlme.data.dataset import NLMEData, load_data


def bundled_path(name: str) -> str:
    """Path of a bundled file, e.g. ``bundled_path("Orange.csv")``."""
    return str(files(__package__) / name)


def load_orange() -> NLMEData:
    """R's ``datasets::Orange``: 5 trees x 7 ages; circumference (mm) against age (days since
    1968-12-31). Trees are the ``variety`` axis."""
    return load_data(
        bundled_path("Orange.csv"), columns="variety=Tree,time=age,value=circumference"
    )


def load_soybean() -> NLMEData:
    """R's ``nlme::Soybean``: 48 plots, mean leaf weight per plant (g) against days after
    planting. Plots are the ``variety`` axis; ``Variety`` (F, P) and ``Year`` (1988-1990) are
    categorical per-plot covariates."""
    return load_data(
        bundled_path("Soybean.csv"),
        columns="variety=Plot,time=Time,value=weight",
        covariate_columns=["Variety", "Year"],
        categorical=["Variety", "Year"],
    )
