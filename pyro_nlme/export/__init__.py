"""Export of fits to ArviZ InferenceData (shared by every engine)."""

from pyro_nlme.export.inference_data import (
    GUIDE_MEAN,
    OBSERVATION_DIM,
    data_coords,
    package_versions,
    to_inference_data,
)

__all__ = ["GUIDE_MEAN", "OBSERVATION_DIM", "data_coords", "package_versions", "to_inference_data"]
