"""Simulator of the target phenotyping design: SNP genotypes with population structure and
linkage disequilibrium, and logistic growth curves with the structure of the ``g2was`` model.

See ``docs/simulator.md``.
"""

from pyro_nlme.simulate.design import (
    DesignConfig,
    SimulatedDataset,
    simulate_design,
    write_markers_csv,
)
from pyro_nlme.simulate.genotypes import Genotypes, simulate_genotypes
from pyro_nlme.simulate.phenotypes import (
    CURVE_PARAMETERS,
    SCENARIO_CODES,
    SCENARIOS,
    logistic_curve,
)

__all__ = [
    "CURVE_PARAMETERS",
    "SCENARIOS",
    "SCENARIO_CODES",
    "DesignConfig",
    "Genotypes",
    "SimulatedDataset",
    "logistic_curve",
    "simulate_design",
    "simulate_genotypes",
    "write_markers_csv",
]
