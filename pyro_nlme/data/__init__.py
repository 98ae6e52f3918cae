"""Data layer: reading, validating and aligning phenotypes, genotypes and covariates."""

from pyro_nlme.data.bundled import load_orange, load_soybean
from pyro_nlme.data.censoring import Censoring
from pyro_nlme.data.dataset import NLMEData, load_data
from pyro_nlme.data.errors import DataError
from pyro_nlme.data.genotypes import GenotypeMatrix, read_genotypes
from pyro_nlme.data.summary import DataSummary

__all__ = [
    "Censoring",
    "DataError",
    "DataSummary",
    "GenotypeMatrix",
    "NLMEData",
    "load_data",
    "load_orange",
    "load_soybean",
    "read_genotypes",
]
