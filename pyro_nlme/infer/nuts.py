"""The NUTS reference engine: Pyro's No-U-Turn sampler on any model written with the project's
convention (docs/model_convention.md), exported through the shared ArviZ exporter.

- Chains run one after the other in this process, chain ``c`` seeded ``seed + c``, each with
  its own warm-up (step size and mass matrix adaptation). Pyro's multi-chain mode forks a process
  per chain: on a machine with few cores that is no faster and less reliable.
- With ``reparam=True`` the individual-level latents with a location-scale prior (and those in a
  plate other than the variety plate, e.g. marker effects) are sampled non-centred through
  :func:`pyro.poutine.reparam` (:class:`~pyro.infer.reparam.LocScaleReparam`, fully decentred),
  so NUTS does not meet the funnel between a random effect and its SD. The draws of the original
  (centred) sites are recovered by replaying the reparametrised model on each draw: the export
  has the same names and dims as any other engine's.
- ``sample_stats`` holds per-draw statistics that Pyro's NUTS computes but does not keep; they
  are recorded by :class:`RecordingNUTS` (see its docstring and docs/nuts.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.infer.reparam import LocScaleReparam
from pyro.ops.welford import WelfordCovariance
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import NLMEData
from pyro_nlme.diagnostics.summary import posterior_table
from pyro_nlme.export import to_inference_data
from pyro_nlme.infer.nuts_init import INIT_MEDIAN_DRAWS, ChainStart, laplace_start
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.util import ModelStructure, model_structure, summary_sites, trace_model

R_HAT_THRESHOLD = 1.01
LOC_SCALE_FAMILIES = (
    dist.Normal,
    dist.StudentT,
    dist.Cauchy,
    dist.Laplace,
    torch.distributions.Normal,
)
DENSE_MASS_MAX_DIM = 256
SAMPLE_STATS = ("diverging", "tree_depth", "n_steps", "step_size", "energy", "accept_prob", "lp")


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of a NUTS fit.

    :param chains: chains, run one after the other.
    :param warmup: warm-up (adaptation) iterations per chain, discarded.
    :param samples: draws kept per chain.
    :param target_accept: target mean acceptance probability of the step-size adaptation.
    :param dense_mass: adapt a dense mass matrix (else diagonal); None: dense when the sampled
        latents have at most :data:`DENSE_MASS_MAX_DIM` scalars. A dense matrix captures the
        linear ridge between a population mean and the random effects around it (Orange:
        ``asymptote + asymptote_effect[i]`` is pinned by each tree's data to about 3 mm while
        ``asymptote`` has a posterior SD of 32 mm), which a diagonal one cannot; it costs
        ``N^2`` per leapfrog step and ``N^3`` per adaptation window.
    :param max_tree_depth: at most ``2 ** max_tree_depth`` leapfrog steps per draw.
    :param initial_window_tree_depth: cap on the tree depth during the first adaptation window
        of the warm-up, while the mass matrix is still the initial one (the Laplace covariance,
        or the identity) (None: no cap). That window only has to reach the typical set and give
        a first variance estimate; with a poor initial metric an uncapped tree costs
        ``2 ** max_tree_depth`` gradients per iteration there. Draws and later windows are not
        affected.
    :param init_iterations: L-BFGS iterations of the Laplace start
        (:func:`pyro_nlme.infer.nuts_init.laplace_start`): chain ``c`` starts at a draw of the
        Laplace approximation at the mode of the sampled density, and the first adaptation
        window uses its covariance as the inverse mass matrix. 0: Pyro's default (start at
        the median of prior draws, identity mass matrix), which fails on Orange (docs/nuts.md).
    :param init_refine_steps: SVI steps refining the Laplace start (``refine_steps`` of
        :func:`~pyro_nlme.infer.nuts_init.laplace_start`; 0: none).
    :param jit: compile the potential energy with the PyTorch JIT (pays off for small models,
        whose cost is Python overhead).
    :param reparam: sample location-scale individual latents non-centred.
    :param noncentred_sites: further latent sites with a location-scale prior sampled
        non-centred whatever ``reparam``: a level the data inform weakly in a model whose other
        levels are better centred (``("genetic_value_component",)`` for ``g2was`` in the
        centred kinship form: 6 varieties give 5 eigen-components, a funnel when centred,
        while each curve is pinned by its data; docs/nuts.md).
    :param seed: chain ``c`` is seeded ``seed + c``; the predictive draws ``seed``.
    :param device: torch device of the data and the model.
    :param progress: show Pyro's progress bar.
    """

    chains: int = 4
    warmup: int = 500
    samples: int = 500
    target_accept: float = 0.8
    dense_mass: bool | None = None
    max_tree_depth: int = 10
    initial_window_tree_depth: int | None = 6
    init_iterations: int = 500
    init_refine_steps: int = 0
    jit: bool = True
    reparam: bool = True
    noncentred_sites: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


class _NonCentredReparam(LocScaleReparam):
    """:class:`LocScaleReparam` fully decentred (``centered=0``), also through masks: the
    decentred noise is ``Normal(0, 1)`` in every cell, masked or not, so a masked cell (no
    data, no prior in the centred model) gets a proper prior that leaves every other margin of
    the posterior unchanged."""

    def __init__(self) -> None:
        super().__init__(centered=0.0)

    def _unwrap(self, fn):
        event_dim = fn.event_dim
        while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
            fn = fn.base_dist
        return fn, event_dim


def _base_distribution(fn):
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def reparametrised_sites(model: Callable, data: NLMEData, **model_kwargs) -> list[str]:
    """Latent sites that ``reparam=True`` samples non-centred: those with a location-scale prior
    (Normal, Student-t, Cauchy, Laplace) inside the variety plate or inside another plate
    (vectors of exchangeable effects whose scale is usually a latent SD)."""
    trace = trace_model(model, data, **model_kwargs)
    names = []
    for name, site in trace.nodes.items():
        if (
            site["type"] != "sample"
            or site["is_observed"]
            or site_is_subsample(site)
            or site["infer"].get("_deterministic", False)
        ):
            continue
        plates = [frame for frame in site["cond_indep_stack"] if frame.vectorized]
        if plates and isinstance(_base_distribution(site["fn"]), LOC_SCALE_FAMILIES):
            names.append(name)
    return names


def latent_size(model: Callable, data: NLMEData, **model_kwargs) -> int:
    """Number of scalars NUTS samples: the sampled (non-observed) sites of one trace."""
    trace = trace_model(model, data, **model_kwargs)
    return sum(
        site["value"].numel()
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
    )


def non_centred(
    model: Callable, data: NLMEData, extra: tuple[str, ...] = (), **model_kwargs
) -> tuple[Callable, list[str]]:
    """The model with every site of :func:`reparametrised_sites`, and the latent sites
    ``extra``, sampled fully non-centred (the model itself if there is none), and those sites.

    :raises ValueError: if a site of ``extra`` is not a latent site with a location-scale prior.
    """
    sites = reparametrised_sites(model, data, **model_kwargs)
    trace = trace_model(model, data, **model_kwargs)
    for name in extra:
        site = trace.nodes.get(name)
        if (
            site is None
            or site["type"] != "sample"
            or site["is_observed"]
            or site["infer"].get("_deterministic", False)
            or not isinstance(_base_distribution(site["fn"]), LOC_SCALE_FAMILIES)
        ):
            raise ValueError(
                f"noncentred site {name!r} is not a latent site with a location-scale prior"
            )
        if name not in sites:
            sites.append(name)
    return reparametrised(model, sites), sites


def reparametrised(model: Callable, sites: list[str]) -> Callable:
    """``model`` with ``sites`` sampled fully non-centred (``model`` itself if none)."""
    if not sites:
        return model
    return poutine.reparam(model, config={name: _NonCentredReparam() for name in sites})


class ShrunkWelfordCovariance(WelfordCovariance):
    """Pyro's Welford covariance whose dense estimate is shrunk towards its own diagonal.

    A window of ``n`` warm-up draws in ``d`` dimensions gives a sample covariance ``S`` of rank
    at most ``n - 1``, and with ``n`` not much above ``d`` its small eigenvalues are far below
    the true ones (Marchenko-Pastur). Stan's regularisation, which Pyro keeps, adds
    ``1e-3 * 5 / (n + 5)`` to the diagonal: an absolute floor that ignores the scales of the
    latents, so directions the window did not span get that floor as their variance, the
    metric calls them narrow and NUTS needs long trajectories to cross them (6 simulated
    varieties, centred kinship form, ``d = 85`` after Pyro's 25-draw window of a 150-iteration
    warm-up: posterior variances from 0.03 to 2,400 times the metric's along its
    eigen-directions, trees of depth 8 to 9; docs/nuts.md).

    Here the estimate is ``((n - 1) S + d diag(S)) / (n - 1 + d)``: the posterior mean of the
    covariance under an inverse-Wishart prior worth ``d`` draws centred on the window's own
    variances. Variances are the window's; correlations are kept in proportion
    ``(n - 1) / (n - 1 + d)`` of the evidence (0.22 after 25 draws in 85 dimensions, 0.98 after
    5,000), so the estimate is positive definite whatever ``n``. Stan's regularisation is then
    applied as before; diagonal estimates are Pyro's.
    """

    def get_covariance(self, regularize=True):
        if self.diagonal or not regularize:
            return super().get_covariance(regularize)
        sample = super().get_covariance(regularize=False)
        n, d = self.n_samples, sample.shape[0]
        covariance = ((n - 1) * sample + d * torch.diag(sample.diagonal())) / (n - 1 + d)
        covariance = (n / (n + 5.0)) * covariance
        covariance.diagonal().add_(1e-3 * 5.0 / (n + 5.0))
        return covariance


class RecordingNUTS(NUTS):
    """Pyro's :class:`~pyro.infer.NUTS`, recording for every transition (warm-up included) the
    statistics Pyro computes but does not keep, in :attr:`transitions` (one dict per
    iteration):

    - ``diverging``: the trajectory diverged (energy error above Pyro's threshold, 1000);
    - ``tree_depth``: successful doublings of the trajectory (Stan's ``treedepth__``);
    - ``n_steps``: leapfrog steps taken (``<= 2 ** (tree_depth + 1) - 1``);
    - ``step_size``: the step size used;
    - ``energy``: the Hamiltonian at the start of the transition (potential energy of the
      previous draw plus the kinetic energy of the fresh momentum): Stan's ``energy__`` up to the
      integration error, what ArviZ's energy plot and BFMI use;
    - ``accept_prob``: mean Metropolis acceptance probability over the trajectory (the quantity
      the step size is adapted on);
    - ``lp``: log density of the draw on the unconstrained space (Jacobians included), minus the
      potential energy.

    They are read by overriding three of Pyro's private methods (``sample``, ``_sample_r``,
    ``_build_tree``) without changing what they compute: the sampler's draws are Pyro's.

    A dense mass matrix is estimated by :class:`ShrunkWelfordCovariance` (shrunk towards its
    diagonal) instead of Pyro's Stan-regularised sample covariance.

    :param initial_window_tree_depth: cap on the tree depth while the warm-up is in its first
        adaptation window; None: no cap.
    :param initial_inverse_mass: maps the mass matrix's blocks (tuple of site names -> whether
        the block is dense) to their inverse mass matrices (``[n, n]`` or ``[n]``), used until
        the first mass-matrix window ends (None: Pyro's identity). The step size is searched
        again under them.
    """

    def __init__(
        self,
        *args,
        initial_window_tree_depth: int | None = None,
        initial_inverse_mass: Callable[[dict[tuple[str, ...], bool]], dict] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._initial_inverse_mass = initial_inverse_mass
        self._configured_tree_depth = self._max_tree_depth
        self._initial_window_tree_depth = initial_window_tree_depth
        self.transitions: list[dict[str, float]] = []
        self._recording = False
        self._nesting = 0
        self._trees: list[tuple[int, float, bool, bool]] = []
        self._start_energy = math.nan

    def _initialize_adapter(self):
        super()._initialize_adapter()
        mass_matrix = self._adapter.mass_matrix_adapter
        for sites, scheme in mass_matrix._adapt_scheme.items():
            if not scheme.diagonal:
                mass_matrix._adapt_scheme[sites] = ShrunkWelfordCovariance(diagonal=False)
        if self._initial_inverse_mass is None:
            return
        identity = mass_matrix.inverse_mass_matrix
        blocks = {sites: matrix.dim() == 2 for sites, matrix in identity.items()}
        mass_matrix.inverse_mass_matrix = {
            sites: matrix.to(identity[sites])
            for sites, matrix in self._initial_inverse_mass(blocks).items()
        }
        if self._adapter.adapt_step_size:
            self._adapter.reset_step_size_adaptation(self._initial_params)

    def _sample_r(self, name):
        r, r_unscaled = super()._sample_r(name)
        if self._recording:
            _, potential_energy, _ = self._fetch_from_cache()
            self._start_energy = float(self._kinetic_energy(r_unscaled) + potential_energy)
        return r, r_unscaled

    def _build_tree(self, z, r, z_grads, log_slice, direction, tree_depth, energy_current):
        self._nesting += 1
        try:
            tree = super()._build_tree(
                z, r, z_grads, log_slice, direction, tree_depth, energy_current
            )
        finally:
            self._nesting -= 1
        if self._recording and self._nesting == 0:
            self._trees.append(
                (
                    int(tree.num_proposals),
                    float(tree.sum_accept_probs),
                    bool(tree.diverging),
                    bool(tree.turning),
                )
            )
        return tree

    def sample(self, params):
        if self._initial_window_tree_depth is not None:
            first_window = self._t < self._warmup_steps and self._adapter._current_window == 0
            self._max_tree_depth = (
                min(self._configured_tree_depth, self._initial_window_tree_depth)
                if first_window
                else self._configured_tree_depth
            )
        step_size = float(self.step_size)
        self._recording, self._trees, self._start_energy = True, [], math.nan
        try:
            draw = super().sample(params)
        finally:
            self._recording = False
        _, potential_energy, _ = self._fetch_from_cache()
        n_steps = sum(tree[0] for tree in self._trees)
        stopped_inside = bool(self._trees) and (self._trees[-1][2] or self._trees[-1][3])
        self.transitions.append(
            {
                "diverging": any(tree[2] for tree in self._trees),
                "tree_depth": len(self._trees) - int(stopped_inside),
                "n_steps": n_steps,
                "step_size": step_size,
                "energy": self._start_energy,
                "accept_prob": sum(tree[1] for tree in self._trees) / max(n_steps, 1),
                "lp": -float(potential_energy),
            }
        )
        return draw


@torch.no_grad()
def recover_centred(
    model: Callable,
    data: NLMEData,
    samples: Mapping[str, torch.Tensor],
    names: list[str],
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """Values of the sites ``names`` of a (reparametrised) model on each draw of its sampled
    sites, by replaying it: ``[draw, *site shape]``.

    :param samples: the sampled sites of ``model``, ``[draw, *shape]``.
    """
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    n_draws = next(iter(samples.values())).shape[0]
    with pyro.validation_enabled(False):
        for i in range(n_draws):
            conditioned = poutine.condition(model, data={k: v[i] for k, v in samples.items()})
            trace = poutine.trace(conditioned).get_trace(data, **model_kwargs)
            for name in names:
                values[name].append(trace.nodes[name]["value"])
    return {name: torch.stack(draws) for name, draws in values.items()}


def _run_chain(
    model: Callable,
    data: NLMEData,
    config: NUTSConfig,
    chain: int,
    start: ChainStart | None,
    model_kwargs: dict,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], dict[str, float]]:
    pyro.set_rng_seed(config.seed + chain)
    if start is None:
        init_strategy = init_to_median(num_samples=INIT_MEDIAN_DRAWS)
    else:
        generator = torch.Generator().manual_seed(config.seed + chain)
        init_strategy = init_to_value(values=start.draw(generator))
    kernel = RecordingNUTS(
        model,
        target_accept_prob=config.target_accept,
        full_mass=config.dense_mass,
        max_tree_depth=config.max_tree_depth,
        initial_window_tree_depth=config.initial_window_tree_depth,
        jit_compile=config.jit,
        ignore_jit_warnings=True,
        init_strategy=init_strategy,
        initial_inverse_mass=None if start is None else start.inverse_mass_matrix,
    )
    mcmc = MCMC(
        kernel,
        num_samples=config.samples,
        warmup_steps=config.warmup,
        num_chains=1,
        disable_progbar=not config.progress,
    )
    start = time.perf_counter()
    mcmc.run(data, **model_kwargs)
    wall = time.perf_counter() - start
    transitions = kernel.transitions[config.warmup :]
    warmup_steps = sum(t["n_steps"] for t in kernel.transitions[: config.warmup])
    sampling_steps = sum(t["n_steps"] for t in transitions)
    timing = {
        "chain": chain,
        "wall_s": wall,
        "warmup_leapfrog_steps": warmup_steps,
        "sampling_leapfrog_steps": sampling_steps,
        "step_size": transitions[-1]["step_size"] if transitions else math.nan,
        "mean_accept_prob": float(np.mean([t["accept_prob"] for t in transitions])),
        "divergences": int(sum(t["diverging"] for t in transitions)),
        "mean_tree_depth": float(np.mean([t["tree_depth"] for t in transitions])),
        "max_tree_depth_hits": int(
            sum(t["tree_depth"] >= config.max_tree_depth for t in transitions)
        ),
    }
    return mcmc.get_samples(), transitions, timing


def fit_nuts(
    model: Callable,
    data: NLMEData,
    config: NUTSConfig = NUTSConfig(),
    *,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
) -> FitResult:
    """Fit a model by NUTS and export the draws.

    :param model: a model following the convention (``model(data, subsample_size=None, **kw)``);
        it is run on the full data (no subsampling).
    :param data: the data set; moved to ``config.device``.
    :param config: sampler settings.
    :param model_name: how the model was given, for the export's attrs.
    :param model_kwargs: keyword arguments of the model (e.g. ``marker_form="kinship"``).
    :returns: a :class:`FitResult` with ``engine="nuts"``: the InferenceData (posterior of every
        latent and deterministic site, ``[chain, draw, ...]``, and ``sample_stats``), the
        population table (mean, SD, 90% HDI, bulk and tail ESS, R-hat), one history row per
        chain (wall time, leapfrog steps, step size, acceptance, divergences, tree depth) and
        warnings on divergences, R-hat above 1.01 and saturated trees.

    The chains run with ``config.device`` as torch's default device, so the constants a model
    creates without one (a prior's float parameters) live where its data do.
    """
    with torch.device(config.device):
        return _fit_nuts(model, data, config, model_name, dict(model_kwargs or {}))


def _fit_nuts(
    model: Callable, data: NLMEData, config: NUTSConfig, model_name: str | None, model_kwargs: dict
) -> FitResult:
    data = data.to(config.device)
    structure = model_structure(model, data, **model_kwargs)
    extra = tuple(config.noncentred_sites)
    non_centred_model, search_sites = non_centred(model, data, extra, **model_kwargs)
    reparam_sites = [name for name in search_sites if name in extra or config.reparam]
    sampled_model = reparametrised(model, reparam_sites)
    if config.dense_mass is None:
        config = dataclasses.replace(
            config,
            dense_mass=latent_size(sampled_model, data, **model_kwargs) <= DENSE_MASS_MAX_DIM,
        )
    start = (
        laplace_start(
            sampled_model,
            data,
            dense=config.dense_mass,
            search_model=None if reparam_sites == search_sites else non_centred_model,
            max_iterations=config.init_iterations,
            refine_steps=config.init_refine_steps,
            seed=config.seed,
            **model_kwargs,
        )
        if config.init_iterations
        else None
    )
    chain_draws, chain_stats, history = [], [], []
    for chain in range(config.chains):
        samples, transitions, timing = _run_chain(
            sampled_model, data, config, chain, start, model_kwargs
        )
        if reparam_sites:
            samples = {
                **{k: v for k, v in samples.items() if k in structure.latent},
                **recover_centred(sampled_model, data, samples, reparam_sites, **model_kwargs),
            }
        chain_draws.append(samples)
        chain_stats.append(transitions)
        history.append(timing)
    draws = {
        name: torch.stack([chain[name] for chain in chain_draws]).reshape(
            (config.chains, config.samples) + info.shape
        )
        for name, info in structure.latent.items()
    }
    sample_stats = {
        stat: np.array([[t[stat] for t in chain] for chain in chain_stats]) for stat in SAMPLE_STATS
    }
    settings = {
        **dataclasses.asdict(config),
        "chain_method": "sequential",
        "init_strategy": (
            f"draw of the Laplace approximation at the mode ({config.init_iterations} L-BFGS "
            "iterations from the prior medians), its covariance as the first inverse mass matrix"
            if start is not None
            else f"init_to_median(num_samples={INIT_MEDIAN_DRAWS}), identity mass matrix"
        ),
        "reparametrised_sites": reparam_sites,
    }
    idata = to_inference_data(
        model,
        data,
        draws,
        engine="nuts",
        settings=settings,
        seed=config.seed,
        model_name=model_name,
        model_kwargs=model_kwargs,
        sample_stats=sample_stats,
        structure=structure,
    )
    names = summary_sites(model, structure)
    table = posterior_table(idata, names)
    history_frame = pd.DataFrame(history)
    return FitResult(
        inference_data=idata,
        engine="nuts",
        population_summary=table,
        history=history_frame,
        warnings=sampler_warnings(idata, table, config, structure),
    )


def sampler_warnings(
    idata: az.InferenceData,
    table: pd.DataFrame,
    config: NUTSConfig,
    structure: ModelStructure,
) -> list[str]:
    """Messages on divergences, R-hat above :data:`R_HAT_THRESHOLD` (population table, then
    every latent site) and trees that hit ``max_tree_depth``."""
    messages = []
    stats = idata.sample_stats
    n_draws = int(stats.sizes["chain"] * stats.sizes["draw"])
    divergences = int(stats["diverging"].sum())
    if divergences:
        messages.append(
            f"{divergences} divergent transition(s) after warm-up (of {n_draws} draws): the "
            "posterior may be biased; raise --target-accept or reparametrise"
        )
    high = table.index[table["r_hat"] > R_HAT_THRESHOLD].tolist()
    if high:
        messages.append(
            f"r_hat > {R_HAT_THRESHOLD} for {', '.join(high)}: run longer or more chains"
        )
    if config.chains > 1:
        r_hat = az.rhat(idata, var_names=list(structure.latent))
        worst = max(float(np.nanmax(r_hat[name].values)) for name in structure.latent)
        if worst > R_HAT_THRESHOLD and not high:
            messages.append(f"max r_hat over all latent sites is {worst:.3f} > {R_HAT_THRESHOLD}")
    saturated = int((stats["tree_depth"] >= config.max_tree_depth).sum())
    if saturated:
        messages.append(
            f"{saturated} draw(s) hit max_tree_depth={config.max_tree_depth}: "
            + (
                "efficiency is limited; a longer warm-up or another parametrisation may help"
                if config.dense_mass
                else "efficiency is limited; a dense mass matrix may help"
            )
        )
    return messages
