"""Simulated phenotyping design: configuration, top-level simulator and writer.

The default :class:`DesignConfig` mimics the target experiment: 250 grapevine varieties, three
watering scenarios, two replicate plants per variety x scenario, one image a day for 21 days and
60,000 SNP markers on 19 chromosomes. See ``docs/simulator.md`` for the generative model and
every output.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pyro_nlme.simulate.effects import simulate_sparse_marker_effects
from pyro_nlme.simulate.genotypes import Genotypes, dosage_moments, simulate_genotypes
from pyro_nlme.simulate.phenotypes import (
    CURVE_PARAMETERS,
    SCENARIO_CODES,
    SCENARIOS,
    TRAITS,
    logistic_curve,
    observe_trait,
    simulate_individual_parameters,
    simulate_marker_effects,
)

__all__ = ["DesignConfig", "SimulatedDataset", "simulate_design", "write_markers_csv"]

_Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DesignConfig:
    """Configuration of a simulated design. Triples are per curve parameter, in the order
    ``log_asymptote`` (log g), ``log_rate`` (log 1/day), ``inflection`` (day).

    :ivar n_varieties: phenotyped varieties.
    :ivar n_heldout: further varieties with genotypes only (no phenotype rows), for genomic
        prediction; their true parameters and curves are in the truth file.
    :ivar n_markers: SNP markers.
    :ivar n_plants: replicate plants per variety x scenario.
    :ivar n_days: images per plant, one a day at ``time = 0, 1, ..., n_days - 1`` (days since
        the start of imaging).
    :ivar n_subpopulations: subpopulations of the Balding-Nichols model.
    :ivar n_chromosomes: chromosomes (19 in grapevine); markers are spread evenly over them.
    :ivar missing_rate: probability that an image is missing, independently (value empty).
    :ivar fst: Balding-Nichols fixation index of the subpopulations.
    :ivar admixed_fraction: fraction of varieties admixed between two subpopulations.
    :ivar allele_frequency_shape: shape ``a`` of the U-shaped ``Beta(a, a)`` of the ancestral
        allele frequencies.
    :ivar min_maf: the ancestral frequencies are truncated to ``[min_maf, 1 - min_maf]``.
    :ivar ld_rho: correlation between adjacent markers of the latent AR(1) haplotype process
        (linkage disequilibrium); the latent correlation at ``d`` markers is ``ld_rho ** d``.
    :ivar well_watered_mean: population mean of the curve parameters under ``well_watered``.
    :ivar moderate_deficit_shift: shift of the means under ``moderate_deficit``.
    :ivar severe_deficit_shift: shift of the means under ``severe_deficit``.
    :ivar genetic_sd: SD of the genetic values (over all simulated varieties).
    :ivar heritability: ``var_g / (var_g + var_vs)`` with ``var_vs`` the variance of the
        variety x scenario (G x E) effects, in ``(0, 1]``.
    :ivar plant_sd: SD of the plant effects.
    :ivar noise_sd: SD of the multiplicative observation noise on the log scale.
    :ivar n_qtl: large-effect QTL per curve parameter (shared ones included).
    :ivar n_shared_qtl: QTL shared by all three curve parameters (pleiotropic).
    :ivar qtl_variance_share: share of the genetic variance due to the QTL (before the final
        rescaling to ``genetic_sd``; the realised share is close to it).
    :ivar qtl_min_maf: minimum minor allele frequency of a QTL marker.
    :ivar trait: what each image records (:data:`~pyro_nlme.simulate.phenotypes.TRAITS`,
        :func:`~pyro_nlme.simulate.phenotypes.observe_trait`): ``biomass`` (log-normal, the
        default), ``count``, ``binary``, ``binomial``, ``ordinal`` or ``censored``.
    :ivar per_gram: the count mean, cumulative hazard or ordinal linear predictor per g of
        biomass (``count``, ``binary``, ``binomial``, ``ordinal``).
    :ivar count_overdispersion: ``a`` of the negative binomial counts (variance
        ``f + a f**2``; 0: Poisson).
    :ivar n_trials: trials per image of the ``binomial`` trait.
    :ivar ordinal_cutpoints: increasing cutpoints of the ``ordinal`` score (logit scale), one
        fewer than the categories.
    :ivar detection_limit: biomass (g) below which a ``censored`` value is recorded as the limit
        with ``cens = 1``.
    """

    n_varieties: int = 250
    n_heldout: int = 0
    n_markers: int = 60_000
    n_plants: int = 2
    n_days: int = 21
    n_subpopulations: int = 4
    n_chromosomes: int = 19
    missing_rate: float = 0.05
    fst: float = 0.08
    admixed_fraction: float = 0.0
    allele_frequency_shape: float = 0.3
    min_maf: float = 0.05
    ld_rho: float = 0.95
    well_watered_mean: _Triple = (math.log(150.0), math.log(0.35), 11.0)
    moderate_deficit_shift: _Triple = (-0.3, -0.1, 0.5)
    severe_deficit_shift: _Triple = (-0.7, -0.25, 1.0)
    genetic_sd: _Triple = (0.25, 0.15, 1.0)
    heritability: _Triple = (0.6, 0.5, 0.4)
    plant_sd: _Triple = (0.08, 0.05, 0.3)
    noise_sd: float = 0.08
    n_qtl: int = 10
    n_shared_qtl: int = 3
    qtl_variance_share: float = 0.4
    qtl_min_maf: float = 0.05
    sparse_qtl: bool = False
    trait: str = "biomass"
    per_gram: float = 0.1
    count_overdispersion: float = 0.1
    n_trials: int = 10
    ordinal_cutpoints: tuple[float, ...] = (2.0, 6.0, 10.0)
    detection_limit: float = 5.0

    def __post_init__(self) -> None:
        """Validate the configuration.

        :raises ValueError: on an out-of-range field.
        """
        trait_checks = {
            f"trait in {TRAITS}": self.trait in TRAITS,
            "per_gram > 0": self.per_gram > 0.0,
            "count_overdispersion >= 0": self.count_overdispersion >= 0.0,
            "n_trials >= 1": self.n_trials >= 1,
            "ordinal_cutpoints increasing": len(self.ordinal_cutpoints) >= 1
            and all(np.diff(self.ordinal_cutpoints) > 0),
            "detection_limit > 0": self.detection_limit > 0.0,
        }
        failed = [name for name, ok in trait_checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid DesignConfig: {'; '.join(failed)}")
        checks = {
            "n_varieties >= 1": self.n_varieties >= 1,
            "n_heldout >= 0": self.n_heldout >= 0,
            "1 <= n_chromosomes <= min(99, n_markers)": 1
            <= self.n_chromosomes
            <= min(99, self.n_markers),
            "n_plants >= 1": self.n_plants >= 1,
            "n_days >= 1": self.n_days >= 1,
            "n_subpopulations >= 1": self.n_subpopulations >= 1,
            "0 <= missing_rate < 1": 0.0 <= self.missing_rate < 1.0,
            "0 < fst < 1": 0.0 < self.fst < 1.0,
            "0 <= admixed_fraction <= 1": 0.0 <= self.admixed_fraction <= 1.0,
            "admixed_fraction == 0 when n_subpopulations == 1": self.n_subpopulations > 1
            or self.admixed_fraction == 0.0,
            "allele_frequency_shape > 0": self.allele_frequency_shape > 0.0,
            "0 <= min_maf < 0.5": 0.0 <= self.min_maf < 0.5,
            "0 <= ld_rho < 1": 0.0 <= self.ld_rho < 1.0,
            "genetic_sd >= 0": all(v >= 0.0 for v in self.genetic_sd),
            "0 < heritability <= 1": all(0.0 < v <= 1.0 for v in self.heritability),
            "plant_sd >= 0": all(v >= 0.0 for v in self.plant_sd),
            "noise_sd >= 0": self.noise_sd >= 0.0,
            "0 <= n_shared_qtl <= n_qtl": 0 <= self.n_shared_qtl <= self.n_qtl,
            "0 <= qtl_variance_share <= 1": 0.0 <= self.qtl_variance_share <= 1.0,
            "qtl_variance_share > 0 exactly when n_qtl > 0": (self.qtl_variance_share > 0.0)
            == (self.n_qtl > 0),
            "0 <= qtl_min_maf < 0.5": 0.0 <= self.qtl_min_maf < 0.5,
            "n_qtl >= 1 when sparse_qtl": self.n_qtl >= 1 or not self.sparse_qtl,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid DesignConfig: {'; '.join(failed)}")
        triples = ("well_watered_mean", "moderate_deficit_shift", "severe_deficit_shift")
        for name in (*triples, "genetic_sd", "heritability", "plant_sd"):
            if len(getattr(self, name)) != len(CURVE_PARAMETERS):
                raise ValueError(f"{name} needs one value per curve parameter {CURVE_PARAMETERS}")

    @property
    def scenario_mean(self) -> np.ndarray:
        """Population means of the curve parameters, ``[n_scenarios, n_curve_parameters]``."""
        base = np.asarray(self.well_watered_mean, dtype=float)
        shifts = np.array([(0.0, 0.0, 0.0), self.moderate_deficit_shift, self.severe_deficit_shift])
        return base + shifts

    @property
    def variety_scenario_sd(self) -> np.ndarray:
        """SD of the G x E effects implied by the heritability, ``[n_curve_parameters]``:
        ``genetic_sd * sqrt((1 - h2) / h2)``."""
        h2 = np.asarray(self.heritability, dtype=float)
        return np.asarray(self.genetic_sd, dtype=float) * np.sqrt((1.0 - h2) / h2)


@dataclass
class SimulatedDataset:
    """A simulated design: phenotypes, genotypes and every true quantity.

    :ivar phenotypes: long table, one row per phenotyped (plant, day), missing images kept with
        NaN ``value``; columns ``variety`` (str), ``scenario`` (str), ``plant`` (str, globally
        unique, e.g. ``V0001-WW-1``), ``time`` (float64, days since the start of imaging),
        ``value`` (float64, biomass in g).
    :ivar dosages: allele dosages 0/1/2, int8 ``[n_varieties + n_heldout, n_markers]``, rows in
        the order of ``variety_ids``.
    :ivar variety_ids: ``V0001``, ...: phenotyped varieties first, held-out ones after.
    :ivar marker_ids: ``chr01_000001``, ... (chromosome, position rank).
    :ivar truth: every true quantity (documented in ``docs/simulator.md``).
    :ivar config: the configuration simulated.
    :ivar seed: the seed simulated.
    """

    phenotypes: pd.DataFrame
    dosages: np.ndarray
    variety_ids: list[str]
    marker_ids: list[str]
    truth: xr.Dataset
    config: DesignConfig
    seed: int

    @property
    def genotypes(self) -> pd.DataFrame:
        """The genotype table, built on each access (see :meth:`genotype_table`)."""
        return self.genotype_table()

    def genotype_table(self) -> pd.DataFrame:
        """Genotypes as a frame: a ``variety`` column then one int8 column per marker.

        :returns: frame ``[n_varieties + n_heldout, 1 + n_markers]`` (about 0.01 s for a
            300 x 60,000 design: one int8 block, no copy).
        """
        varieties = pd.DataFrame({"variety": self.variety_ids})
        markers = pd.DataFrame(self.dosages, columns=self.marker_ids, copy=False)
        return pd.concat([varieties, markers], axis=1)

    def write(self, out_dir: str | Path, marker_format: str = "csv") -> dict[str, Path]:
        """Write the phenotypes, the markers and the truth to a folder (created if missing).

        Files: ``phenotypes.csv`` (the :attr:`phenotypes` table, missing values empty, floats
        written with round-trip precision); ``markers.csv`` (:func:`write_markers_csv`) or
        ``markers.parquet`` (one ``variety`` string column then one int8 column per marker,
        zstd-compressed). Parquet is acceptable but not fast with 60,000 columns, because its
        footer holds metadata per column: for the 300 x 60,000 design, writing takes about 2.5 s
        and ``pandas.read_parquet`` about 5 s, against 0.1 s to write ``markers.csv`` (36 MB;
        ``pandas.read_csv`` of it takes about 8 s, its C parser being slow on wide rows).
        ``truth.nc`` is :attr:`truth` as netCDF-4 through ``h5netcdf``.

        :param out_dir: output folder.
        :param marker_format: ``"csv"`` or ``"parquet"``.
        :returns: paths keyed ``phenotypes``, ``markers``, ``truth``.
        :raises ValueError: on an unknown ``marker_format``.
        """
        if marker_format not in ("csv", "parquet"):
            raise ValueError(f"marker_format must be 'csv' or 'parquet', got {marker_format!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "phenotypes": out / "phenotypes.csv",
            "markers": out / f"markers.{marker_format}",
            "truth": out / "truth.nc",
        }
        self.phenotypes.to_csv(paths["phenotypes"], index=False)
        if marker_format == "csv":
            write_markers_csv(paths["markers"], self.variety_ids, self.marker_ids, self.dosages)
        else:
            _write_markers_parquet(
                paths["markers"], self.variety_ids, self.marker_ids, self.dosages
            )
        self.truth.to_netcdf(paths["truth"], engine="h5netcdf")
        return paths


def write_markers_csv(
    path: str | Path, variety_ids: list[str], marker_ids: list[str], dosages: np.ndarray
) -> None:
    """Write a dosage matrix as CSV fast: header ``variety,<marker ids>``, then one row per
    variety, ``<id>,<d>,<d>,...``.

    Each row's bytes are built from the int8 array directly (digit codes ``dosage + ord("0")``
    interleaved with commas), with no per-cell Python work.

    :param path: output file.
    :param variety_ids: row labels ``[n_varieties]``.
    :param marker_ids: column labels ``[n_markers]``.
    :param dosages: int8 dosages in ``0..9`` (in practice 0/1/2), ``[n_varieties, n_markers]``.
    """
    body = np.empty((dosages.shape[0], 2 * dosages.shape[1]), dtype=np.uint8)
    body[:, 0::2] = dosages.astype(np.uint8) + ord("0")
    body[:, 1::2] = ord(",")
    body[:, -1] = ord("\n")
    with open(path, "wb") as handle:
        handle.write(",".join(["variety", *marker_ids]).encode() + b"\n")
        for variety, row in zip(variety_ids, body, strict=True):
            handle.write(variety.encode() + b",")
            handle.write(row.data)


def _write_markers_parquet(
    path: Path, variety_ids: list[str], marker_ids: list[str], dosages: np.ndarray
) -> None:
    """Write a dosage matrix as Parquet: a ``variety`` column then one int8 column per marker.

    :param path: output file.
    :param variety_ids: row labels ``[n_varieties]``.
    :param marker_ids: column labels ``[n_markers]``.
    :param dosages: int8 ``[n_varieties, n_markers]``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = np.ascontiguousarray(dosages.T)
    arrays = [pa.array(variety_ids, type=pa.string()), *(pa.array(c) for c in columns)]
    table = pa.Table.from_arrays(arrays, names=["variety", *marker_ids])
    pq.write_table(table, path, compression="zstd", use_dictionary=False, write_statistics=False)


def _identifiers(config: DesignConfig) -> tuple[list[str], np.ndarray]:
    """Variety identifiers and globally unique plant identifiers.

    :param config: design configuration.
    :returns: ``variety_ids`` (``V0001``, ..., at least 4 digits) and ``plant_id``,
        str ``[n_varieties + n_heldout, n_scenarios, n_plants]`` (``V0001-WW-1``).
    """
    n_total = config.n_varieties + config.n_heldout
    width = max(4, len(str(n_total)))
    variety_ids = [f"V{i:0{width}d}" for i in range(1, n_total + 1)]
    plant_id = np.array(
        [
            [[f"{v}-{code}-{p}" for p in range(1, config.n_plants + 1)] for code in SCENARIO_CODES]
            for v in variety_ids
        ],
        dtype=object,
    )
    return variety_ids, plant_id


def simulate_design(config: DesignConfig = DesignConfig(), seed: int = 0) -> SimulatedDataset:
    """Simulate genotypes, curve parameters and images of a phenotyping design.

    Four independent random streams are spawned from ``np.random.SeedSequence(seed)``: genotypes,
    marker effects, plant parameters, observations. The same ``(config, seed)`` gives identical
    outputs.

    :param config: design configuration.
    :param seed: non-negative integer seed.
    :returns: the simulated dataset.
    """
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    n_total = config.n_varieties + config.n_heldout
    geno = simulate_genotypes(
        streams[0],
        n_total,
        config.n_markers,
        n_chromosomes=config.n_chromosomes,
        n_subpopulations=config.n_subpopulations,
        fst=config.fst,
        allele_frequency_shape=config.allele_frequency_shape,
        min_maf=config.min_maf,
        ld_rho=config.ld_rho,
        admixed_fraction=config.admixed_fraction,
    )
    mean, sd = dosage_moments(geno.dosages)
    simulate_effects = (
        simulate_sparse_marker_effects if config.sparse_qtl else simulate_marker_effects
    )
    effects = simulate_effects(
        streams[1],
        geno.dosages,
        mean,
        sd,
        np.asarray(config.genetic_sd, dtype=float),
        n_qtl=config.n_qtl,
        n_shared_qtl=config.n_shared_qtl,
        qtl_variance_share=config.qtl_variance_share,
        qtl_min_maf=config.qtl_min_maf,
    )
    params = simulate_individual_parameters(
        streams[2],
        effects["genetic_value"],
        config.scenario_mean,
        config.variety_scenario_sd,
        np.asarray(config.plant_sd, dtype=float),
        config.n_plants,
    )
    time = np.arange(config.n_days, dtype=float)
    curve = logistic_curve(params["individual_parameter"], time)
    recorded = observe_trait(
        streams[3],
        curve[: config.n_varieties],
        config.trait,
        noise_sd=config.noise_sd,
        missing_rate=config.missing_rate,
        per_gram=config.per_gram,
        count_overdispersion=config.count_overdispersion,
        n_trials=config.n_trials,
        cutpoints=config.ordinal_cutpoints,
        detection_limit=config.detection_limit,
    )
    value = recorded.pop("value")
    variety_ids, plant_id = _identifiers(config)
    phenotypes = pd.DataFrame(
        {
            "variety": np.repeat(variety_ids[: config.n_varieties], value[0].size),
            "scenario": np.tile(
                np.repeat(SCENARIOS, config.n_plants * config.n_days), config.n_varieties
            ),
            "plant": np.repeat(plant_id[: config.n_varieties].ravel(), config.n_days),
            "time": np.tile(time, value.size // config.n_days),
            "value": value.ravel(),
            **{name: column.ravel() for name, column in recorded.items()},
        }
    )
    truth = _truth_dataset(
        config, seed, variety_ids, plant_id, geno, (mean, sd), effects, params, curve
    )
    return SimulatedDataset(
        phenotypes=phenotypes,
        dosages=geno.dosages,
        variety_ids=variety_ids,
        marker_ids=geno.marker_ids,
        truth=truth,
        config=config,
        seed=seed,
    )


def _truth_dataset(
    config: DesignConfig,
    seed: int,
    variety_ids: list[str],
    plant_id: np.ndarray,
    geno: Genotypes,
    moments: tuple[np.ndarray, np.ndarray],
    effects: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    curve: np.ndarray,
) -> xr.Dataset:
    """Assemble the truth dataset (variables documented in ``docs/simulator.md``).

    :param config: the configuration.
    :param seed: the seed.
    :param variety_ids: variety identifiers ``[n_varieties + n_heldout]``.
    :param plant_id: plant identifiers ``[variety, scenario, plant]``.
    :param geno: the simulated panel.
    :param moments: dosage column means and SDs (``ddof=0``), ``[n_markers]`` each.
    :param effects: output of :func:`~pyro_nlme.simulate.phenotypes.simulate_marker_effects`.
    :param params: output of
        :func:`~pyro_nlme.simulate.phenotypes.simulate_individual_parameters`.
    :param curve: noise-free curves ``[variety, scenario, plant, time]`` in g.
    :returns: the dataset.
    """
    mean, sd = moments
    n_total = config.n_varieties + config.n_heldout
    vp = ("variety", "curve_parameter")
    mp = ("marker", "curve_parameter")
    vsp = ("variety", "scenario", "plant")
    cp = ("curve_parameter",)
    phi_units = "log g, log 1/day, day (per curve_parameter)"

    def var(dims, data, description, units=None):
        attrs = {"description": description} | ({"units": units} if units else {})
        return xr.Variable(dims, data, attrs=attrs)

    data_vars = {
        "scenario_mean": var(
            ("scenario", "curve_parameter"), config.scenario_mean, "population mean", phi_units
        ),
        "genetic_value": var(vp, effects["genetic_value"], "Z @ marker_effect", phi_units),
        "qtl_genetic_value": var(
            vp, effects["qtl_genetic_value"], "part of genetic_value due to the QTL", phi_units
        ),
        "marker_effect": var(mp, effects["marker_effect"], "effect per standardised dosage"),
        "qtl": var(mp, effects["qtl"], "marker is a large-effect QTL of the parameter"),
        "qtl_share": var(
            cp,
            effects["qtl_genetic_value"].var(axis=0) / effects["genetic_value"].var(axis=0),
            "realised share of the genetic variance due to the QTL (all varieties)",
        ),
        "variety_scenario_effect": var(
            ("variety", "scenario", "curve_parameter"),
            params["variety_scenario_effect"],
            "G x E effect",
            phi_units,
        ),
        "plant_effect": var(
            (*vsp, "curve_parameter"), params["plant_effect"], "plant effect", phi_units
        ),
        "individual_parameter": var(
            (*vsp, "curve_parameter"),
            params["individual_parameter"],
            "phi = scenario_mean + genetic_value + variety_scenario_effect + plant_effect",
            phi_units,
        ),
        "noise_free_curve": var(
            (*vsp, "time"), curve, "exp(phi0) * sigmoid(exp(phi1) * (time - phi2))", "g"
        ),
        "genetic_sd": var(cp, np.asarray(config.genetic_sd), "SD of genetic_value"),
        "variety_scenario_sd": var(cp, config.variety_scenario_sd, "SD of the G x E effects"),
        "plant_sd": var(cp, np.asarray(config.plant_sd), "SD of the plant effects"),
        "heritability": var(
            cp, np.asarray(config.heritability), "genetic_sd^2 / (genetic_sd^2 + vs_sd^2)"
        ),
        "noise_sd": var((), config.noise_sd, "SD of the log-normal observation noise"),
        "subpopulation": var(("variety",), geno.subpopulation, "main subpopulation (0-based)"),
        "ancestry": var(("variety", "population"), geno.ancestry, "ancestry proportions"),
        "plant_id": var(vsp, plant_id.astype(str), "globally unique plant identifier"),
        "heldout": var(
            ("variety",),
            np.arange(n_total) >= config.n_varieties,
            "genotyped only, no phenotype rows",
        ),
        "chromosome": var(("marker",), geno.chromosome, "chromosome (1-based)"),
        "position": var(("marker",), geno.position, "position rank in the chromosome (1-based)"),
        "ancestral_frequency": var(
            ("marker",), geno.ancestral_frequency, "ancestral frequency of the counted allele"
        ),
        "population_frequency": var(
            ("population", "marker"),
            geno.population_frequency,
            "Balding-Nichols frequency of the counted allele",
        ),
        "dosage_mean": var(("marker",), mean, "mean dosage over all varieties (Z centring)"),
        "dosage_sd": var(("marker",), sd, "SD (ddof=0) of dosage over all varieties (Z scaling)"),
    }
    attrs = {
        "description": (
            "Ground truth of a simulated NLME plant-growth design with SNP markers "
            "(pyro_nlme.simulate.simulate_design); see docs/simulator.md"
        ),
        "seed": seed,
        "pyro_nlme_version": importlib.metadata.version("pyro_nlme"),
    }
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool):  # netCDF has no boolean attributes
            value = int(value)
        attrs[field.name] = (
            np.asarray(value, dtype=float) if isinstance(value, tuple | list) else value
        )
    return xr.Dataset(
        data_vars,
        coords={
            "scenario": list(SCENARIOS),
            "plant": np.arange(1, config.n_plants + 1),
            "variety": variety_ids,
            "time": var(
                ("time",), np.arange(config.n_days, dtype=float), "days since start", "day"
            ),
            "marker": geno.marker_ids,
            "curve_parameter": list(CURVE_PARAMETERS),
            "population": np.arange(config.n_subpopulations),
        },
        attrs=attrs,
    )
