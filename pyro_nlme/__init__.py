"""pyro_nlme: nonlinear mixed-effects models of plant physiological dynamics as Pyro programs.

Layout: ``data`` (reading, validation, alignment) -> ``model`` (curves, observation models,
convention) and the model definitions in ``pyro_nlme_models`` -> ``infer`` (SVI, NUTS, SAEM /
MCEM engines) -> ``export`` (ArviZ InferenceData) -> ``diagnostics`` and ``reference``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyro_nlme")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
