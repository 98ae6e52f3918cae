"""What every engine returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import arviz as az
import pandas as pd


@dataclass
class FitResult:
    """A finished fit.

    :param inference_data: the exported InferenceData (see :mod:`pyro_nlme.export`).
    :param engine: ``"svi"``, ``"nuts"``, ``"saem"``, ``"mcem"``.
    :param population_summary: one row per scalar population parameter (columns depend on the
        engine: ``mean, sd, hdi_5%, hdi_95%`` for Bayesian engines, ``estimate, se`` for ML).
    :param history: per-step (or per-iteration) trace of the optimisation, if any.
    :param warnings: messages the command line prints after the table (divergences, ...).
    """

    inference_data: az.InferenceData
    engine: str
    population_summary: pd.DataFrame
    history: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        """The text the command line prints."""
        lines = [f"engine: {self.engine}", self.population_summary.to_string()]
        attrs = self.population_summary.attrs
        if "-2LL" in attrs:  # maximum-likelihood engines (SAEM, MCEM)
            error = attrs.get("-2LL_mcse", float("nan"))
            lines.append(
                f"-2LL {attrs['-2LL']:.3f} (Monte-Carlo SE {error:.3f}), "
                f"AIC {attrs['AIC']:.3f}, BIC {attrs['BIC']:.3f}"
            )
        lines += [f"warning: {message}" for message in self.warnings]
        return "\n".join(lines)
