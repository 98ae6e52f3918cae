"""What was read, masked and kept: the report of ``pyro-nlme check``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DataSummary:
    """Counts of a loaded data set. Nothing is dropped silently: every row is either observed
    or masked (missing value), and ``n_removed_rows`` says how many were removed (none, today).

    :param n_plants: plants present (variety x scenario x plant combinations).
    :param n_distinct_times: distinct measurement times over the whole table.
    :param n_time_slots: most measurements of one plant (the ``time`` axis of the grid).
    :param n_observed: values present (mask True).
    :param n_missing_values: rows with an empty value (missing images), masked, never imputed.
    :param time_min: earliest measurement time; ``time_max`` the latest (time units).
    :param value_min: smallest observed value; ``value_max`` the largest (trait units; NaN when
        nothing is observed).
    :param n_left_censored: observed values that are upper bounds (``cens`` 1, no ``limit``);
        ``n_right_censored`` lower bounds (``cens`` -1, no ``limit``); ``n_interval_censored``
        values known to lie between ``value`` and ``limit``. All are counted in ``n_observed``.
    """

    source: str
    n_rows: int
    n_varieties_phenotyped: int
    n_varieties_genotyped_only: int
    n_scenarios: int
    n_plants: int
    n_distinct_times: int
    n_time_slots: int
    n_observed: int
    n_missing_values: int
    n_removed_rows: int
    n_markers: int
    n_imputed_genotypes: int
    n_monomorphic_markers: int
    n_covariates: int
    time_min: float
    time_max: float
    value_min: float
    value_max: float
    n_left_censored: int = 0
    n_right_censored: int = 0
    n_interval_censored: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"phenotypes: {self.source}",
            f"  rows                          {self.n_rows}",
            f"  observed values               {self.n_observed}",
            f"  missing values (masked)       {self.n_missing_values}",
            f"  removed rows                  {self.n_removed_rows}",
            f"  varieties phenotyped          {self.n_varieties_phenotyped}",
            f"  varieties genotyped only      {self.n_varieties_genotyped_only} (kept)",
            f"  scenarios                     {self.n_scenarios}",
            f"  plants                        {self.n_plants}",
            f"  distinct times                {self.n_distinct_times}",
            f"  measurements per plant (max)  {self.n_time_slots}",
            f"  time range                    {self.time_min:g} .. {self.time_max:g}",
            f"  value range                   {self.value_min:g} .. {self.value_max:g}",
            f"  covariate columns             {self.n_covariates}",
        ]
        if self.n_left_censored or self.n_right_censored or self.n_interval_censored:
            lines += [
                f"  left-censored values          {self.n_left_censored}",
                f"  right-censored values         {self.n_right_censored}",
                f"  interval-censored values      {self.n_interval_censored}",
            ]
        if self.n_markers:
            lines += [
                f"  markers                       {self.n_markers}",
                f"  monomorphic markers           {self.n_monomorphic_markers}",
                f"  imputed genotypes (mean)      {self.n_imputed_genotypes}",
            ]
        return "\n".join(lines)
