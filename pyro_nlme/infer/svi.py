"""The SVI engine: minibatch stochastic variational inference on any model that follows the
convention (docs/model_convention.md).

One step: the guide draws a minibatch of varieties (``subsample_size``) and the model replays
the same indices, so the ELBO estimate is unbiased for the full data set (sites inside the
variety plate are scaled by ``n_varieties / batch_size``). Optimiser: ClippedAdam with an
exponential learning-rate decay from ``lr`` to ``lr_final`` over ``lr_decay_steps`` (then
constant), the encoder at ``lr * encoder_lr_factor`` and its marker layer at a further
``marker_lr_factor``. Stops on an ELBO plateau (:class:`PlateauRule`) or at ``max_steps``; a
non-finite loss or gradient stops the run with an error naming the step and
the site, after saving the last finite state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import xarray as xr
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import init_to_value
from pyro.infer.reparam import LocScaleReparam
from pyro.infer.util import zero_grads
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

from pyro_nlme.data import NLMEData
from pyro_nlme.diagnostics.summary import posterior_table
from pyro_nlme.export import GUIDE_MEAN, to_inference_data
from pyro_nlme.infer.checkpoint import load_checkpoint, save_checkpoint
from pyro_nlme.infer.guides import build_guide
from pyro_nlme.infer.guides.amortized import ENCODER, MARKER_LAYER
from pyro_nlme.infer.guides.init import init_to_prior_median
from pyro_nlme.infer.guides.modes import conditional_modes
from pyro_nlme.infer.guides.pooled import pooled_estimates
from pyro_nlme.infer.result import FitResult
from pyro_nlme.infer.stopping import PlateauRule
from pyro_nlme.infer.util import ModelStructure, model_structure, summary_sites
from pyro_nlme.model.kinship import attach_marker_effects
from pyro_nlme.model.priors import MARKER_PLATE


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the sites or parameters."""


@dataclass(frozen=True)
class SVIConfig:
    """Settings of an SVI fit (all stored in the InferenceData attrs).

    :param guide: ``amortized``, ``normal`` or ``lowrank``.
    :param init: ``pooled``: population-level locations start at a pooled fit of the
        population curve (:func:`~pyro_nlme.infer.guides.pooled.pooled_estimates`), the rest at
        prior medians; ``prior``: every location at its (conditional) prior median.
    :param anchor: amortised guide: ``modes`` measures the individual locations from each
        variety's conditional modes, and starts the real-valued population latents at theirs,
        with the scales at their initial values
        (:func:`~pyro_nlme.infer.guides.modes.conditional_modes`); ``prior``: from the
        conditional prior means.
    :param batch_size: varieties per minibatch (None: all varieties every step).
    :param max_steps: step budget.
    :param lr: initial learning rate; ``lr_final`` the rate reached after ``lr_decay_steps``
        steps (None: ``max_steps``) of exponential decay, and kept after them.
    :param encoder_lr_factor: learning-rate factor of the amortised encoder's weights (a step
        of every weight of a layer in the same direction moves its output far more than a step
        of one variational parameter).
    :param marker_lr_factor: further factor for the encoder's marker layer. That layer acts on
        the varieties' marker principal-component scores
        (:func:`~pyro_nlme.infer.guides.amortized.marker_features`), a per-variety code the
        encoder uses for the corrections its trajectory branch misses. On the full target
        design, after 2,500 steps, the loss was 200 nats above that of the former 60,000-wide
        layer on the dosages at the default (the base rate ``lr``), 480 at ``1.0`` and 980 at
        ``0.1`` (one run each, docs/svi.md).
    :param clip_norm: gradient norm clipping of ClippedAdam.
    :param num_particles: ELBO particles per step.
    :param stopping: the plateau rule, checked once the learning rate is held (None: run
        ``max_steps``). A loss that stops falling while the rate still decays is the
        optimiser's noise floor at that rate: with a decay over 15,000 steps the rule fired
        at 2,500 on the target design, the noise SD at 0.154 (truth 0.08).
    :param num_draws: posterior draws exported from the fitted guide.
    :param checkpoint_every: steps between checkpoints (0: none).
    :param checkpoint_path: checkpoint file (needed for checkpoints and ``resume``).
    :param resume: continue from ``checkpoint_path`` if it exists.
    :param rank: rank of the low-rank guide (None: Pyro's default).
    :param coupling: in the amortised guide, let the individual locations depend linearly on
        the population-level draws (:class:`~pyro_nlme.infer.guides.AmortizedGuide`); without
        it the posterior SDs of population means come out several times too small.
    :param correlated_events: in the amortised guide, a full covariance over each cell of a
        site's event dim (a plant's curve parameters) instead of a diagonal one
        (:class:`~pyro_nlme.infer.guides.AmortizedGuide`): individual-level posterior SDs
        near NUTS's, but a random-effect SD biased (docs/svi.md).
    :param correlated_plates: with ``correlated_events``, plates whose cells are correlated
        too: ``("plant",)`` gives all plants of a variety x scenario one joint Gaussian over
        their curve parameters.
    :param exact_levels: in the amortised guide, centred Gaussian levels drawn from their
        exact conditional given the population and their child level (g2was centred:
        ``variety_scenario_parameter`` given its plants), not from the encoder
        (:class:`~pyro_nlme.infer.guides.AmortizedGuide`).
    :param noncentred_sites: latent sites with a location-scale prior fitted non-centred
        (besides per-marker effects, always): a weakly informed level in a model whose other
        levels are better centred, ``("genetic_value_component",)`` for ``g2was`` in the
        centred kinship form. Centred, the genetic SD of the inflection crept from 0.70 to
        0.74 over steps 2,750 to 3,500 of a fit of the target design whose loss no longer
        fell; non-centred it stayed at 0.88-0.92 from step 1,250 (docs/svi.md).
    :param marker_updates: ``gradient``: every variational parameter by Adam; ``cavi``: with
        ``guide="normal"`` and a spike-and-slab, ridge or horseshoe marker prior (effects
        form), the marker effects' factor by coordinate ascent every ``cavi_every`` steps
        (the effects then stay centred), from the guide's current medians of the centred
        site ``cavi_response_site``
        (:mod:`~pyro_nlme.infer.guides.marker_cavi`). By Adam, 60,000 effects found none of
        10 QTL and the genetic SD collapsed (docs/marker_priors.md).
    :param cavi_every: steps between coordinate-ascent updates.
    :param cavi_response_site: centred Normal site whose location is linear in the marker
        effects (``g2was`` with ``parametrization="centred"``: the default).
    :param encoder_hidden: width of the amortised encoder.
    :param encoder_markers: feed the variety's markers to the amortised encoder (besides its
        trajectories).
    :param variety_offsets: in the amortised guide, a free per-variety offset of the encoder's
        locations and log scales, at the base learning rate
        (:class:`~pyro_nlme.infer.guides.AmortizedGuide`).
    :param seed: seeds parameters' initialisation, minibatches and draws.
    :param device: ``cpu``, ``cuda``, ``cuda:1``, ...
    :param progress: show a progress bar.
    """

    guide: str = "amortized"
    init: str = "pooled"
    anchor: str = "modes"
    batch_size: int | None = 64
    max_steps: int = 5000
    lr: float = 0.01
    lr_final: float = 0.001
    lr_decay_steps: int | None = None
    encoder_lr_factor: float = 0.1
    marker_lr_factor: float = 10.0
    clip_norm: float = 10.0
    num_particles: int = 1
    stopping: PlateauRule | None = field(default_factory=PlateauRule)
    num_draws: int = 200
    checkpoint_every: int = 0
    checkpoint_path: str | None = None
    resume: bool = False
    rank: int | None = None
    coupling: bool = True
    correlated_events: bool = False
    exact_levels: tuple[str, ...] = ()
    correlated_plates: tuple[str, ...] = ()
    noncentred_sites: tuple[str, ...] = ()
    marker_updates: str = "gradient"
    cavi_every: int = 10
    cavi_response_site: str = "variety_scenario_parameter"
    encoder_hidden: int = 64
    encoder_markers: bool = True
    variety_offsets: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


MARKER_UPDATES = ("gradient", "cavi")


def _decay_steps(config: SVIConfig) -> int:
    return max(config.lr_decay_steps or config.max_steps, 1)


def _optimizer(config: SVIConfig) -> ClippedAdam:
    decay = (config.lr_final / config.lr) ** (1.0 / _decay_steps(config))

    def per_parameter(module_name: str, param_name: str) -> dict:
        lr = config.lr
        if param_name.startswith(ENCODER + "."):
            lr *= config.encoder_lr_factor
            if MARKER_LAYER in param_name:
                lr *= config.marker_lr_factor
        return {"lr": lr, "lrd": decay, "clip_norm": config.clip_norm}

    return ClippedAdam(per_parameter)


def _hold_learning_rate(optim: ClippedAdam) -> None:
    """Stop the learning-rate decay of every parameter's optimiser."""
    for optimizer in optim.optim_objs.values():
        for group in optimizer.param_groups:
            group["lrd"] = 1.0


def _nonfinite_sites(model, guide, args, kwargs) -> list[str]:
    """Sites whose value or log-density is not finite, in one guide/model trace pair."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        bad = []
        for label, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                log_prob = site["fn"].log_prob(site["value"])
                if not (torch.isfinite(site["value"]).all() and torch.isfinite(log_prob).all()):
                    bad.append(f"{label}:{name}")
    return bad


@dataclass
class _Training:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def noncentred(
    model: Callable,
    structure: ModelStructure,
    extra_sites: Sequence[str] = (),
    marker_sites: bool = True,
) -> Callable:
    """``model`` with its per-marker effects and the sites ``extra_sites`` non-centred
    (``LocScaleReparam``): the guide then learns unit-scale ``*_decentered`` sites. A
    per-marker effect's natural scale (``genetic_sd / sqrt(M)``) is far below any useful Adam
    step or initial guide SD; an extra site is a level the data inform weakly (see
    ``SVIConfig.noncentred_sites``). Only Normal sites are decentred (a horseshoe's
    half-Cauchy local scales or a spike-and-slab mixture are not location-scale).

    :param marker_sites: decentre the per-marker effects (False: they stay centred, for
        coordinate-ascent updates, whose factor is on the effects themselves).
    :raises ValueError: if an extra site is not a latent site of the model.
    """
    unknown = sorted(set(extra_sites) - set(structure.latent))
    if unknown:
        raise ValueError(f"noncentred_sites {unknown} are not latent sites of the model")
    sites = set(extra_sites)
    if marker_sites:
        sites |= {
            n for n, i in structure.population.items() if MARKER_PLATE in i.plate_dims.values()
        }

    def config(message: dict) -> LocScaleReparam | None:
        fn = message["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if message["name"] in sites and type(fn) is dist.Normal:
            return LocScaleReparam(centered=0.0)
        return None

    return poutine.reparam(model, config=config)


def _draw_from_guide(
    guide: Callable,
    fitted_model: Callable,
    data: NLMEData,
    names: list[str],
    num_draws: int,
    model_kwargs: dict,
) -> dict[str, torch.Tensor]:
    """``num_draws`` joint draws of the model's latent sites ``names`` (centred), full data,
    each ``[1, num_draws, *shape]``: the guide's draw replayed through the fitted model."""
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(num_draws):
            guide_trace = poutine.trace(guide).get_trace(data, subsample_size=None, **model_kwargs)
            trace = poutine.trace(poutine.replay(fitted_model, trace=guide_trace)).get_trace(
                data, subsample_size=None, **model_kwargs
            )
            for name in draws:
                draws[name].append(trace.nodes[name]["value"].detach())
    return {name: torch.stack(values)[None] for name, values in draws.items()}


def _attach_guide_means(idata, guide: Callable, data: NLMEData) -> None:
    """Add the ``guide_mean`` group where the guide has closed-form means of some sites: the
    marker effects of a joint Gaussian coordinate-ascent factor
    (:class:`~pyro_nlme.infer.guides.marker_cavi.GaussianCoordinateAscent`). Their draws'
    marginal SDs can be as wide as the prior's while the mean is small, so a mean over draws
    is mostly Monte-Carlo noise: rank effects and predict from this group instead."""
    means = getattr(guide, "closed_form_means", lambda data: {})(data)
    if not means:
        return
    group = xr.Dataset(
        {
            name: (idata.posterior[name].dims[2:], value.detach().cpu().numpy())
            for name, value in means.items()
        },
        coords={
            dim: idata.posterior[dim].values
            for name in means
            for dim in idata.posterior[name].dims[2:]
        },
    )
    idata.add_groups({GUIDE_MEAN: group})


def fit_svi(
    model: Callable,
    data: NLMEData,
    config: SVIConfig = SVIConfig(),
    *,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
) -> FitResult:
    """Fit ``model`` to ``data`` by SVI and export the fitted guide's draws.

    The fit runs with ``config.device`` as torch's default device, so the constants a model
    creates without one (a prior's float parameters) live where its data do.

    :raises NonFiniteError: on a non-finite loss or gradient (the last finite state is saved
        to ``checkpoint_path`` when one is given).
    """
    with torch.device(config.device):
        return _fit_svi(model, data, config, model_name, dict(model_kwargs or {}))


def _fit_svi(
    model: Callable, data: NLMEData, config: SVIConfig, model_name: str | None, model_kwargs: dict
) -> FitResult:
    data = data.to(config.device)
    batch_size = config.batch_size
    if batch_size is not None and batch_size >= data.n_varieties:
        batch_size = None
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    structure = model_structure(model, data, **model_kwargs)
    fitted_model = noncentred(
        model, structure, config.noncentred_sites, marker_sites=config.marker_updates != "cavi"
    )
    fitted_structure = model_structure(fitted_model, data, **model_kwargs)
    if config.init not in ("pooled", "prior"):
        raise ValueError(f"init must be 'pooled' or 'prior', got {config.init!r}")
    if config.anchor not in ("modes", "prior"):
        raise ValueError(f"anchor must be 'modes' or 'prior', got {config.anchor!r}")
    if config.marker_updates not in MARKER_UPDATES:
        raise ValueError(
            f"marker_updates must be one of {MARKER_UPDATES}, got {config.marker_updates!r}"
        )
    if config.marker_updates == "cavi" and config.guide != "normal":
        raise ValueError("marker_updates='cavi' needs guide='normal'")
    init_values = {}
    if config.init == "pooled":
        init_values = pooled_estimates(
            fitted_model, data, fitted_structure, summary_sites(model, structure), model_kwargs
        )
    population_modes, anchors = {}, {}
    if config.guide == "amortized" and config.anchor == "modes":
        init_loc_fn = init_to_value(values=init_values, fallback=init_to_prior_median)
        population_modes, anchors = conditional_modes(
            fitted_model, data, fitted_structure, init_loc_fn, model_kwargs
        )
    guide = build_guide(
        config.guide,
        fitted_model,
        data,
        fitted_structure,
        rank=config.rank,
        init_values={**init_values, **population_modes},
        cavi_response_site=(config.cavi_response_site if config.marker_updates == "cavi" else None),
        model_kwargs=model_kwargs,
        **(
            {
                "hidden": config.encoder_hidden,
                "use_markers": config.encoder_markers,
                "coupled_sites": summary_sites(model, structure) if config.coupling else (),
                "anchors": anchors,
                "correlated_events": config.correlated_events,
                "exact_levels": config.exact_levels,
                "correlated_plates": config.correlated_plates,
                "variety_offsets": config.variety_offsets,
            }
            if config.guide == "amortized"
            else {}
        ),
    )
    elbo = Trace_ELBO(num_particles=config.num_particles)
    optim = _optimizer(config)
    kwargs = {"subsample_size": batch_size, **model_kwargs}
    with pyro.validation_enabled(False):  # non-finite values are reported at step 1 instead
        guide(data, **kwargs)  # creates the parameters
    training = _Training()
    checkpoint = Path(config.checkpoint_path) if config.checkpoint_path else None
    if config.resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, optim)
        training = _Training(state["step"], state["losses"], state["seconds"])
    # Distribution argument checks cost a third of a step at this size; non-finite losses and
    # gradients are caught at every step instead, naming the sites.
    with pyro.validation_enabled(False):
        _train(fitted_model, guide, elbo, optim, data, kwargs, config, training, checkpoint)

    samples = _draw_from_guide(
        guide, fitted_model, data, list(structure.latent), config.num_draws, model_kwargs
    )
    history = pd.DataFrame(
        {
            "step": range(1, len(training.losses) + 1),
            "loss": training.losses,
            "seconds": training.seconds,
        }
    )
    idata = to_inference_data(
        model,
        data,
        samples,
        engine="svi",
        settings={
            **dataclasses.asdict(config),
            "steps_run": training.step,
            "pooled_init": {name: value.tolist() for name, value in init_values.items()},
            "anchored_sites": sorted([*population_modes, *anchors]),
        },
        seed=config.seed,
        model_name=model_name,
        model_kwargs=model_kwargs,
        structure=structure,
        extra_groups={"training_history": _history_dataset(history)},
    )
    if data.markers is not None and model_kwargs.get("marker_form") == "kinship":
        attach_marker_effects(idata, data.markers)
    _attach_guide_means(idata, guide, data)
    warnings = []
    if training.step >= config.max_steps and config.stopping is not None:
        warnings.append(
            f"stopped at the step budget ({config.max_steps}) before the ELBO plateau rule "
            "was met: raise --max-steps or check the history"
        )
    return FitResult(
        inference_data=idata,
        engine="svi",
        population_summary=posterior_table(
            idata, summary_sites(model, structure), diagnostics=False
        ),
        history=history,
        warnings=warnings,
    )


def _train(
    model: Callable,
    guide: Callable,
    elbo: Trace_ELBO,
    optim: ClippedAdam,
    data: NLMEData,
    kwargs: dict,
    config: SVIConfig,
    training: _Training,
    checkpoint: Path | None,
) -> None:
    """Run steps until the plateau rule or the budget, updating ``training`` in place."""

    def save(path: Path) -> None:
        save_checkpoint(
            path,
            optim,
            step=training.step,
            losses=training.losses,
            seconds=training.seconds,
            config=dataclasses.asdict(config),
        )

    progress = tqdm(
        total=config.max_steps,
        initial=training.step,
        disable=not config.progress,
        desc="SVI",
        unit="step",
    )
    started = time.perf_counter() - (training.seconds[-1] if training.seconds else 0.0)
    coordinate_update = getattr(guide, "coordinate_update", None)
    while training.step < config.max_steps:
        if coordinate_update is not None and training.step % config.cavi_every == 0:
            coordinate_update(data, **kwargs)
        with poutine.trace(param_only=True) as capture:
            loss = elbo.loss_and_grads(model, guide, data, **kwargs)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        # A sum is non-finite if any term is (and 30x cheaper than isfinite().all() on a
        # 60,000 x 32 tensor); it could overflow only at gradients near 1e38 / size.
        sums = torch.stack([p.grad.sum() for p in params if p.grad is not None])
        if not (math.isfinite(loss) and sums.isfinite().all()):
            _stop_on_nonfinite(model, guide, data, kwargs, loss, training.step, checkpoint, save)
        optim(params)
        zero_grads(params)
        training.step += 1
        if training.step == _decay_steps(config):  # a later checkpoint stores the held rate
            _hold_learning_rate(optim)
        training.losses.append(float(loss))
        training.seconds.append(time.perf_counter() - started)
        progress.update()
        if training.step % 50 == 0:
            progress.set_postfix(elbo=f"{-loss:.4g}")
        if checkpoint is not None and config.checkpoint_every:
            if training.step % config.checkpoint_every == 0:
                save(checkpoint)
        if (
            config.stopping is not None
            and training.step >= _decay_steps(config)
            and config.stopping.converged(training.losses)
        ):
            break
    progress.close()


def _stop_on_nonfinite(model, guide, data, kwargs, loss, step, checkpoint, save) -> None:
    store = pyro.get_param_store()
    names = [
        store.param_name(param)
        for param in store._params.values()
        if param.grad is not None and not torch.isfinite(param.grad).all()
    ]
    zero_grads(set(store._params.values()))
    sites = _nonfinite_sites(model, guide, (data,), kwargs)
    where = f"site(s) {sites}" if sites else f"gradient of parameter(s) {names[:10]}"
    kept = ""
    if checkpoint is not None:
        path = checkpoint.with_name(checkpoint.stem + "-last-finite" + checkpoint.suffix)
        save(path)
        kept = f"; the last finite state is saved to {path}"
    raise NonFiniteError(f"SVI step {step + 1}: non-finite loss ({loss}) at {where}{kept}")


def _history_dataset(history: pd.DataFrame) -> xr.Dataset:
    return xr.Dataset(
        {
            "loss": ("step", history["loss"].to_numpy()),
            "seconds": ("step", history["seconds"].to_numpy()),
        },
        coords={"step": history["step"].to_numpy()},
    )
