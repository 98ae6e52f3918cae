"""Maximum likelihood by SAEM and MCEM on the project's model functions (``docs/saem.md``).

:func:`fit_saem` and :func:`fit_mcem` take any model written with the convention
(``docs/model_convention.md``) and return a :class:`~pyro_nlme.infer.result.FitResult`.
"""

from pyro_nlme.infer.saem.algorithm import SAEMConfig, fit_saem, log_likelihood_at
from pyro_nlme.infer.saem.mcem import MCEMConfig, fit_mcem
from pyro_nlme.infer.saem.plots import plot_convergence

__all__ = [
    "MCEMConfig",
    "SAEMConfig",
    "fit_mcem",
    "fit_saem",
    "log_likelihood_at",
    "plot_convergence",
]
