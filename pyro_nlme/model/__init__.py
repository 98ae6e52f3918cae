"""Model building blocks: curves, observation models, priors and the model convention."""

from pyro_nlme.model.convention import (
    CURVE_SITE,
    OBSERVED_SITE,
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.curves import CURVES, curve_parameter_names
from pyro_nlme.model.observations import OBSERVATION_MODELS, observation_model
from pyro_nlme.model.priors import GrowthScale, marker_effects

__all__ = [
    "CURVES",
    "CURVE_SITE",
    "OBSERVATION_MODELS",
    "OBSERVED_SITE",
    "GrowthScale",
    "curve_parameter_names",
    "marker_effects",
    "nlme_model",
    "observation_model",
    "observe",
    "plant_plate",
    "scenario_plate",
    "time_plate",
    "variety_plate",
]
