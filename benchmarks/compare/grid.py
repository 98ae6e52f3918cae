"""What is run: a *cell* is one engine on one data set with one replicate seed and fixed
settings. The presets (``quick``, ``full``) list their cells explicitly.

A cell's key is a hash of everything that determines its result (engine, data, seed,
settings); the time limit is not part of it, so a rerun with a longer limit finds the same
cell (and reruns it only if asked: ``--retry``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

ENGINES = (
    "svi-normal",
    "svi-lowrank",
    "svi-amortized",
    "nuts",
    "saem",
    "mcem",
    "numpyro-nuts",
    "pynlme-saem",
    "pynlme-nlme",
)
PEERS = ("numpyro-nuts", "pynlme-saem", "pynlme-nlme")
DATASETS = ("design", "orange", "soybean")


@dataclass(frozen=True)
class DataSpec:
    """A data set.

    :param name: ``design`` (simulated target design, :mod:`pyro_nlme.simulate`), ``orange`` or
        ``soybean`` (bundled).
    :param n_varieties: phenotyped varieties (design only).
    :param n_heldout: varieties with markers only, predicted from them (design only).
    :param n_markers: markers simulated; 0 fits ``g2was`` without markers (design only).
    :param marker_form: ``kinship`` or ``effects`` form of ``g2was`` with markers.
    :param size: label of the size (``small``, ``medium``, ``full``, ``scaling``), for tables.
    """

    name: str
    n_varieties: int = 0
    n_heldout: int = 0
    n_markers: int = 0
    marker_form: str = "kinship"
    size: str = ""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown data set {self.name!r}; choose one of {DATASETS}")
        if self.marker_form not in ("kinship", "effects"):
            raise ValueError(f"marker_form must be kinship or effects, got {self.marker_form!r}")

    @property
    def label(self) -> str:
        """Short name for tables: ``orange``, ``design-30v-2000m``, ``design-30v-nomarkers``."""
        if self.name != "design":
            return self.name
        markers = f"{self.n_markers}m-{self.marker_form}" if self.n_markers else "nomarkers"
        return f"design-{self.n_varieties}v-{markers}"


@dataclass(frozen=True)
class Cell:
    """One engine on one data set.

    :param engine: one of :data:`ENGINES`.
    :param data: the data set.
    :param seed: replicate seed: seeds the simulation (design) and the engine.
    :param settings: engine settings, as sorted ``(name, value)`` pairs (JSON values).
    :param time_limit_s: wall-clock limit of the cell's process, seconds.
    """

    engine: str
    data: DataSpec
    seed: int = 0
    settings: tuple = field(default=())
    time_limit_s: float = 600.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {ENGINES}")
        object.__setattr__(self, "settings", tuple(sorted(dict(self.settings).items())))

    @property
    def options(self) -> dict:
        return dict(self.settings)

    def identity(self) -> dict:
        """Everything that determines the result (not the time limit)."""
        return {
            "engine": self.engine,
            "data": asdict(self.data),
            "seed": self.seed,
            "settings": {k: v for k, v in self.settings},
        }

    @property
    def key(self) -> str:
        """16 hex digits of the SHA-256 of :meth:`identity` (canonical JSON)."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({**self.identity(), "time_limit_s": self.time_limit_s})

    @classmethod
    def from_json(cls, text: str) -> Cell:
        raw = json.loads(text)
        return cls(
            engine=raw["engine"],
            data=DataSpec(**raw["data"]),
            seed=raw["seed"],
            settings=tuple(raw["settings"].items()),
            time_limit_s=raw["time_limit_s"],
        )


# -- data sets ----------------------------------------------------------------------------

SIZES = {
    # varieties, held-out varieties, markers
    "small": (30, 10, 2_000),
    "medium": (100, 25, 10_000),
    "full": (250, 50, 60_000),
}
SCALING_VARIETIES = (25, 50, 100, 250)
ORANGE = DataSpec("orange")
SOYBEAN = DataSpec("soybean")


def design(size: str, markers: bool = True, form: str = "kinship") -> DataSpec:
    varieties, heldout, n_markers = SIZES[size]
    return DataSpec(
        "design",
        n_varieties=varieties,
        n_heldout=heldout if markers else 0,
        n_markers=n_markers if markers else 0,
        marker_form=form,
        size=size,
    )


def _cells(engine, datasets, seeds, settings, limit) -> list[Cell]:
    return [Cell(engine, d, s, tuple(settings.items()), limit) for d in datasets for s in seeds]


# -- presets ------------------------------------------------------------------------------


def quick_grid() -> list[Cell]:
    """About 10 minutes on 2 unloaded cores: one seed; the small design (30 varieties, 2,000
    markers, kinship form) for SVI, a 12-variety design without markers for SAEM, Orange for
    every engine that has a reference there (SVI mean-field, SAEM, MCEM, NUTS, NumPyro's NUTS,
    pynlme's nlme and SAEM)."""
    seeds = (0,)
    small = design("small")
    tiny = DataSpec("design", n_varieties=12, size="tiny")
    svi = {"max_steps": 1500, "batch_size": None, "lr": 0.02, "num_draws": 200}
    nuts = {"chains": 2, "warmup": 150, "samples": 150, "max_tree_depth": 6}
    # saemix's random-walk kernel costs ~60 model evaluations an iteration on g2was (30
    # individual dims): MALA, and fewer importance draws, keep the design cell in minutes.
    saem_design = {
        "iterations": [60, 40],
        "chains": 1,
        "kernel": "mala",
        "importance_samples": 1000,
        "fisher_samples": 1000,
    }
    return [
        *_cells("svi-normal", [small, ORANGE], seeds, svi, 300),
        *_cells("svi-amortized", [small], seeds, {**svi, "batch_size": 16}, 600),
        *_cells("saem", [ORANGE], seeds, {"iterations": [150, 100], "chains": 5}, 300),
        *_cells("saem", [tiny], seeds, saem_design, 600),
        *_cells("mcem", [ORANGE], seeds, {"iterations": 20, "final_samples": 100}, 420),
        *_cells("nuts", [ORANGE], seeds, nuts, 420),
        *_cells("numpyro-nuts", [ORANGE], seeds, nuts, 300),
        *_cells("pynlme-nlme", [ORANGE], seeds, {}, 120),
        *_cells("pynlme-saem", [ORANGE], seeds, {"iterations": [150, 100], "chains": 5}, 120),
    ]


def full_grid(seeds: tuple[int, ...] = (0, 1, 2)) -> list[Cell]:
    """The paper's grid. What runs where, and why:

    - SVI mean-field, low-rank and amortised on every design size (kinship form) and the
      scaling series; the effects form (60,000 marker effects) at full size for SVI only.
      Low-rank and mean-field see all varieties each step (batch None) up to medium size;
      amortised uses minibatches of 64 (its point).
    - NUTS (Pyro) on Orange, Soybean, the small and medium designs and the full design in
      kinship form only (the effects form has 180,000 latents), with long limits.
    - SAEM and MCEM on Orange, Soybean (saemix's random-walk kernels) and the designs without
      markers (MALA kernel: the random walk costs ~60 model evaluations an iteration there; no
      markers, as their M-step has no closed form for 60,000 marker effects).
    - NumPyro's NUTS on Orange and the small design without markers (the models written in
      NumPyro, :mod:`.numpyro_models`); SAEM, SVI and NUTS also on that data set, for the
      comparison.
    - pynlme's SAEM on Orange and Soybean, its nlme on Orange.
    """
    svi = {"max_steps": 5000, "lr": 0.02, "num_draws": 200}
    mcmc = {"chains": 4, "warmup": 500, "samples": 500, "max_tree_depth": 10}
    saem = {"iterations": [300, 200], "chains": 5}
    saem_design = {"iterations": [300, 200], "chains": 2, "kernel": "mala"}
    mcem = {"iterations": 40}
    mcem_design = {**mcem, "kernel": "mala"}
    sizes = [design(s) for s in SIZES]
    nomarkers = [design(s, markers=False) for s in ("small", "medium")]
    scaling = [
        DataSpec("design", n_varieties=v, n_heldout=50, n_markers=60_000, size="scaling")
        for v in SCALING_VARIETIES
    ]
    batch_all = {**svi, "batch_size": None}
    batch_64 = {**svi, "batch_size": 64}
    cells = [
        *_cells("svi-normal", sizes[:2] + nomarkers + [ORANGE, SOYBEAN], seeds, batch_all, 1800),
        *_cells("svi-normal", sizes[2:] + scaling, seeds, batch_64, 3600),
        *_cells("svi-lowrank", sizes[:2] + nomarkers + [ORANGE, SOYBEAN], seeds, batch_all, 1800),
        *_cells("svi-amortized", sizes + scaling + nomarkers, seeds, batch_64, 3600),
        *_cells("svi-amortized", [design("full", form="effects")], seeds, batch_64, 7200),
        *_cells("nuts", [ORANGE, SOYBEAN] + nomarkers[:1], seeds, mcmc, 7200),
        *_cells("nuts", sizes, seeds, mcmc, 4 * 3600),
        *_cells("saem", [ORANGE, SOYBEAN], seeds, saem, 3600),
        *_cells("saem", nomarkers, seeds, saem_design, 3600),
        *_cells("mcem", [ORANGE, SOYBEAN], seeds, mcem, 3600),
        *_cells("mcem", nomarkers, seeds, mcem_design, 3600),
        *_cells("numpyro-nuts", [ORANGE] + nomarkers[:1], seeds, mcmc, 3600),
        *_cells("pynlme-saem", [ORANGE, SOYBEAN], seeds, saem, 1800),
        *_cells("pynlme-nlme", [ORANGE], seeds, {}, 600),
    ]
    return cells


PRESETS = {"quick": quick_grid, "full": full_grid}
