"""The amortised guide: one network maps a variety's markers and observed trajectories to the
posterior of its individual-level latents; population-level latents are mean-field normal.

With far more markers than varieties, a guide cannot do genomic prediction by itself (it would
memorise each training variety's posterior, PYRO_NOTES): the markers enter the *model*
(``marker_effect``), and the encoder conditions on the variety's data (and markers). The
prediction for a variety never phenotyped is then the model's conditional distribution given
the population-level posterior (:mod:`pyro_nlme.infer.predict`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import to_pyro_module_
from torch import nn

from pyro_nlme.data import GenotypeMatrix, NLMEData
from pyro_nlme.infer.guides.init import init_to_prior_median
from pyro_nlme.infer.guides.modes import Anchor
from pyro_nlme.infer.guides.pooled import PriorMeans
from pyro_nlme.infer.util import (
    ModelStructure,
    SiteInfo,
    base_distribution,
    is_real_support,
    sites_moved_by,
    trace_model,
)
from pyro_nlme.model.convention import CURVE_SITE, VARIETY_DIM, VARIETY_PLATE
from pyro_nlme.model.kinship import cached_relationship_factor

ENCODER = "encoder"
"""Attribute name of the encoder in :class:`AmortizedGuide` (its parameters' name prefix)."""
MARKER_LAYER = "marker_layer"
"""Name of the encoder's first marker layer (its learning rate is set apart: see SVIConfig)."""


class VarietyEncoder(nn.Module):
    """``(marker features [B, R], trajectory features [B, F]) -> (loc, scale) [B, D]`` and
    ``correlations [B, C]``.

    The marker branch is one linear layer (``R x marker_hidden`` weights) on the varieties'
    marker features (:func:`marker_features`); the trajectory branch an MLP on values, times
    and masks. The head starts at ``loc = 0``, ``scale = init_scale`` (the individual
    latents' prior centre) and ``correlations = 0``.

    :param n_marker_features: marker features per variety (0: no marker branch).
    :param n_features: trajectory features per variety.
    :param output_dim: unconstrained individual-level dimensions per variety.
    :param n_correlations: free below-diagonal entries of the factors' Cholesky factors per
        variety (see :class:`AmortizedGuide`).
    """

    def __init__(
        self,
        n_marker_features: int,
        n_features: int,
        output_dim: int,
        hidden: int = 64,
        marker_hidden: int = 32,
        init_scale: float = 0.05,
        n_correlations: int = 0,
    ):
        super().__init__()
        self.output_dim = output_dim
        self.n_correlations = n_correlations
        self.marker_layer = (
            nn.Linear(n_marker_features, marker_hidden) if n_marker_features else None
        )
        self.trajectory = nn.Sequential(nn.Linear(n_features, hidden), nn.ELU())
        width = hidden + (marker_hidden if n_marker_features else 0)
        self.head = nn.Sequential(
            nn.Linear(width, hidden), nn.ELU(), nn.Linear(hidden, 2 * output_dim + n_correlations)
        )
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[output_dim : 2 * output_dim] = math.log(math.expm1(init_scale))

    def forward(
        self, markers: torch.Tensor | None, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:param markers: ``[B, n_marker_features]``, see :func:`marker_features`.
        :param features: ``[B, n_features]``, see :func:`trajectory_features`."""
        hidden = [self.trajectory(features)]
        if self.marker_layer is not None:
            hidden.append(torch.nn.functional.elu(self.marker_layer(markers)))
        out = self.head(torch.cat(hidden, -1))
        loc, raw_scale, correlations = out.split(
            [self.output_dim, self.output_dim, self.n_correlations], -1
        )
        return loc, torch.nn.functional.softplus(raw_scale) + 1e-4, correlations


def marker_features(markers: GenotypeMatrix, dtype: torch.dtype) -> torch.Tensor:
    """``[V, V]``: the varieties' marker principal-component scores, the rows of ``F``,
    ``F F^T = K = Z Z^T / M`` (:func:`~pyro_nlme.model.kinship.cached_relationship_factor`,
    ``Z`` the standardised dosages), times ``sqrt(V)``: their mean square is the mean
    diagonal of ``K`` (about 1), so a default-initialised linear layer starts at the output
    scale of one on ``Z``.

    A linear function of a variety's ``M`` standardised dosages, ``Z w``, is a linear function
    of its row of ``F`` (``Z = sqrt(M) F W^T`` for orthonormal ``W``), and the gradient of the
    phenotyped varieties' ELBO leaves ``w`` outside their span untouched: a linear layer on
    ``F`` is the ``M``-wide marker layer restricted to what the data move, with ``V`` inputs
    instead of ``M`` (60,000 on the target design). ``K`` is computed once from blocks of
    int8 dosages, without a float copy of the whole matrix, and shared with the kinship form
    of a model."""
    return cached_relationship_factor(markers, dtype) * markers.n_varieties**0.5


def _asinh_features(values: torch.Tensor, batch: NLMEData) -> torch.Tensor:
    """``asinh`` of values in units of 1% of the data's largest magnitude, zero where masked."""
    summary = batch.summary
    value_unit = max(abs(summary.value_max), abs(summary.value_min), 1e-12) / 100
    return torch.asinh(values / value_unit) * batch.mask


def trajectory_features(batch: NLMEData, prior_curve: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, F]``: per grid cell the observed value and the model's prediction at the
    individual latents' conditional prior means (``asinh`` of 1%-of-max units), the time (0-1
    over the data's span) and the mask, zeroed where masked; ``F = 4 * S * P * T``."""
    summary = batch.summary
    span = max(summary.time_max - summary.time_min, 1e-6)
    mask = batch.mask.to(batch.times.dtype)
    values = torch.zeros_like(batch.times) if batch.values is None else batch.values
    prior = torch.zeros_like(batch.times) if prior_curve is None else prior_curve
    times = (batch.times - summary.time_min) / span * mask
    features = [_asinh_features(values, batch), _asinh_features(prior, batch), times, mask]
    return torch.stack(features, -1).flatten(1)


def _rows(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` of a per-variety tensor; a tensor shared by all varieties (first dim 1)
    as it is."""
    return values if values.shape[0] == 1 else values[idx]


class _SiteLayout:
    """Where an individual site's per-variety block sits in the encoder output."""

    def __init__(
        self,
        info: SiteInfo,
        offset: int,
        correlation_offset: int,
        correlated: bool,
        correlated_plates: Sequence[str] = (),
    ):
        batch_ndim = len(info.shape) - info.event_dim
        if batch_ndim != -VARIETY_DIM:
            raise ValueError(
                f"individual site {info.name!r} has {batch_ndim} batch dims; the convention "
                f"puts the variety plate at dim {VARIETY_DIM} with nothing to its left"
            )
        self.name = info.name
        self.event_dim = info.event_dim
        self.transform = biject_to(info.support)
        self.prior_relative = is_real_support(info.support)
        self.unconstrained_shape = tuple(self.transform.inv.forward_shape(info.shape))[1:]
        self.size = math.prod(self.unconstrained_shape)
        self.offset = offset
        event_size = self.unconstrained_shape[-1] if self.event_dim == 1 else 1
        self.inner_plates = [
            (name, info.shape[batch_ndim + dim], dim)
            for dim, name in sorted(info.plate_dims.items())
            if name != VARIETY_PLATE
        ]
        # the cell's own plate dims, as axes of the value with an event dim (negative)
        joint = correlated and self.prior_relative and self.event_dim <= 1
        self.joint_axes = [
            dim - 1
            for name, size, dim in self.inner_plates
            if joint and name in correlated_plates and size > 1
        ]
        self.joint_shape = [info.shape[batch_ndim + axis + 1] for axis in self.joint_axes]
        cell_size = event_size * math.prod(self.joint_shape)
        self.correlated = correlated and self.prior_relative and cell_size > 1
        self.tril_rows, self.tril_cols = torch.tril_indices(cell_size, cell_size, -1)
        self.n_correlations = self.size // cell_size * len(self.tril_rows) if self.correlated else 0
        self.correlation_offset = correlation_offset

    def to_cells(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` values of the site's shape -> the same with each cell's joint plate
        dims (e.g. its plants) moved into the last dim (``[..., 1, ..., J * K]``)."""
        x = x.unsqueeze(-1) if self.event_dim == 0 else x
        for axis in self.joint_axes:
            x = x.movedim(axis, -2).flatten(-2).unsqueeze(axis)
        return x

    def from_cells(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_cells`."""
        for axis, size in zip(reversed(self.joint_axes), reversed(self.joint_shape), strict=True):
            x = x.squeeze(axis).unflatten(-1, (size, -1)).movedim(-2, axis)
        return x.squeeze(-1) if self.event_dim == 0 else x


def _cholesky_factor(
    scale: torch.Tensor,
    coefficients: torch.Tensor,
    unit: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """``[..., k, k]``: the lower-triangular factor ``L`` of one cell's ``k`` coordinates,
    ``L_ii = scale_i`` and ``L_ij = coefficient_ij * unit_i / unit_j * scale_j`` below the
    diagonal: coordinate ``i`` regresses on the draws of the coordinates before it, in their
    units, with conditional SD ``scale_i``.

    :param scale: ``[..., k]``; ``coefficients`` ``[..., k (k - 1) / 2]``, the entries
        ``(rows, cols)`` of the strict lower triangle; ``unit`` the coordinates' units,
        broadcastable to ``scale``.
    """
    unit = unit.expand_as(scale)
    below = coefficients * unit[..., rows] / unit[..., cols] * scale[..., cols]
    lower = scale.new_zeros(scale.shape + scale.shape[-1:])
    lower[..., rows, cols] = below
    return lower + torch.diag_embed(scale)


_NO_SHAPE = torch.Size()


class CholeskyNormal(dist.MultivariateNormal):
    """A ``MultivariateNormal`` given by its Cholesky factor whose log-density at its own last
    draw is computed from that draw's standard-normal noise ``eps``, ``-eps' eps / 2 - sum log
    L_ii - k log(2 pi) / 2``, rather than by a triangular solve of ``value - loc``.

    The solve loses the draw to float32 rounding when ``L`` is ill-conditioned (a conditional
    SD near its floor under large regression coefficients), and the optimiser exploits the
    error: an amortised joint factor over sibling plants (12 varieties x 3 plants, lr 0.01
    decaying 10-fold over 9,000 steps) took its loss from 183 at step 1,500 to -338,000 at step
    9,000, with the factor's own draws at a log-density of -1e6 each. Any other value is
    evaluated as by ``MultivariateNormal``.
    """

    _draw: tuple[torch.Tensor, torch.Tensor] | None = None

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + (self._unbroadcasted_scale_tril @ noise.unsqueeze(-1)).squeeze(-1)
        self._draw = (value, noise)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._draw is None or value is not self._draw[0]:
            return super().log_prob(value)
        noise = self._draw[1]
        diagonal = self._unbroadcasted_scale_tril.diagonal(dim1=-2, dim2=-1)
        size = self._event_shape[0]
        return -0.5 * ((noise**2).sum(-1) + size * math.log(2 * math.pi)) - diagonal.log().sum(-1)


class ExactLevel(NamedTuple):
    """A centred Gaussian level drawn from its exact conditional given its child level."""

    layout: _SiteLayout
    """The level's site (its plates and event dims)."""
    child: str
    """The site whose location is the level's value, broadcast over ``sum_dims``."""
    sum_dims: tuple[int, ...]
    """The child's dims the level is broadcast over (the plants of a variety x scenario)."""


def exact_level(model: Callable, data: NLMEData, info: SiteInfo, model_kwargs: dict) -> ExactLevel:
    """Check that ``info`` is a centred Gaussian level with one child level, and find it.

    The site must be ``Normal`` given the population, and changing its value must change the
    log-density of exactly one other site, a latent ``Normal`` whose location is the site's value
    (broadcast over the child's extra plate dims, e.g. plants). Its conditional given the
    population and the child's value is then Gaussian in closed form
    (:meth:`AmortizedGuide.forward`).

    :raises ValueError: naming the site, if it is not such a level.
    """
    kwargs = {"subsample_size": None, **model_kwargs}
    trace = trace_model(model, data, **kwargs)
    node = trace.nodes[info.name]
    if type(base_distribution(node["fn"])) is not dist.Normal:
        raise ValueError(f"exact level {info.name!r}: its prior must be Normal")
    _, changed = sites_moved_by(model, data, trace, {info.name: node["value"] + 1.0}, kwargs)
    child = trace.nodes[changed[0]] if len(changed) == 1 else None
    if (
        child is None
        or child["is_observed"]
        or type(base_distribution(child["fn"])) is not dist.Normal
    ):
        raise ValueError(
            f"exact level {info.name!r}: exactly one latent Normal site may depend on it, found "
            f"{changed} (g2was: parametrization='centred' with several plants)"
        )
    loc = base_distribution(child["fn"]).loc
    value = node["value"]
    child_shape = child["value"].shape
    if len(child_shape) != len(value.shape) or not torch.equal(loc, value.expand_as(loc)):
        raise ValueError(
            f"exact level {info.name!r}: the location of {changed[0]!r} must be its value"
        )
    sum_dims = tuple(
        dim - len(child_shape)
        for dim in range(len(child_shape))
        if value.shape[dim] == 1 and child_shape[dim] > 1
    )
    return ExactLevel(_SiteLayout(info, 0, 0, False), changed[0], sum_dims)


class _Reference(NamedTuple):
    """Fixed per-site quantities of :meth:`AmortizedGuide.reference`, per real-valued
    individual site."""

    prior_mean: dict[str, torch.Tensor]
    origin: dict[str, torch.Tensor]
    unit: dict[str, torch.Tensor]
    scale_unit: dict[str, torch.Tensor]
    prior_share: dict[str, torch.Tensor]


class AmortizedGuide(PyroModule):
    """Mean-field normal over population-level latents + encoder over individual-level ones.

    :param model: a model following the convention.
    :param data: the full data set (sizes the encoder).
    :param structure: :func:`~pyro_nlme.infer.util.model_structure` of the model.
    :param use_markers: feed the variety's marker features (:func:`marker_features`) to the
        encoder.
    :param hidden: encoder width; ``marker_hidden`` width of the marker layer.
    :param init_scale: initial SD of the population factors (unconstrained scale) and initial
        relative SD of the individual ones (a fraction of their conditional prior SD at the
        initial population values).
    :param coupled_sites: population sites the individual locations depend on (see below);
        default: none.
    :param init_loc_fn: initial values of the population factors' locations.
    :param anchors: per individual site, its :class:`~pyro_nlme.infer.guides.modes.Anchor`
        over all varieties (:func:`~pyro_nlme.infer.guides.modes.conditional_modes`): the
        origin of the site's locations, its initial scales and its prior's share of each
        coordinate's precision. Sites without one are measured from their conditional prior
        means at the initial population values, with a share of 1.
    :param correlated_events: give each cell of a real-valued site with one event dim (the
        curve parameters of a plant, say) a full ``k x k`` covariance, its below-diagonal
        Cholesky coefficients an encoder output starting at 0; otherwise (default) every
        coordinate is independent given the population.
    :param correlated_plates: with ``correlated_events``, inner plates (e.g. ``plant``) whose
        slots join the cell: one Gaussian over all plants of a variety x scenario and their
        curve parameters, sampled as the auxiliary site ``_{name}_joint``.
    :param exact_levels: centred Gaussian levels (e.g. g2was's
        ``variety_scenario_parameter``) drawn from their exact conditional given the
        population and their child level's draw (:func:`exact_level`,
        :meth:`exact_conditional`) instead of an encoder output.
    :param model_kwargs: the model's keyword arguments (to check ``exact_levels``).
    :param variety_offsets: add a free parameter per variety to the encoder's location and log
        scale outputs, both starting at 0 (semi-amortised: the encoder gives the starting point,
        the offsets close the amortisation gap on the fitted varieties). The offsets of a
        variety without data are fitted to its prior alone; predictions for new varieties come
        from the model, not the guide (:mod:`~pyro_nlme.infer.predict`).

    The guide is ``q(population) * prod_v q(individual_v | population, data_v)``, the structure
    of Agrawal & Domke (2021) for hierarchical models: the individual locations are the
    encoder's output plus a linear term ``coupling @ eps``, ``eps`` the standardised deviation
    of the ``coupled_sites`` draw from its guide location (unconstrained), with coefficients
    shared by all varieties and starting at 0. Without it the population factors are
    independent of the individual ones, and the posterior SD of a population mean that the
    individual effects can offset (a scenario mean against the effects of the same scenario)
    comes out several times too small. The individual locations also follow the change of their
    conditional prior mean from its initial value with a gain per coordinate (``prior_gain``,
    shared by all varieties, starting at 1): for a Gaussian level the exact conditional
    posterior mean is linear in the prior mean, with slope ``w`` the prior's share of the
    precision. Both terms are multiplied by the coordinate's ``w`` at its anchor, per variety
    (:meth:`reference`): a coordinate its data determine barely moves with the population draw,
    however far a shared coefficient moves the others (docs/svi.md).

    With ``correlated_events`` the factor of each cell of an event (a plant's log asymptote,
    log rate and inflection) is a full Gaussian: a curve seen before its asymptote pins a
    combination of its parameters, not each one, and a diagonal factor has each coordinate's
    conditional SD, about 0.4 of its marginal one for the inflection. Measured against NUTS
    (docs/svi.md): the plant parameters' posterior SDs go from 0.42 to 0.89 of NUTS's and the
    noise SD to NUTS's, but the plant SD of the inflection, fitted from factors of the plants
    independent of their variety x scenario level, comes out 7 NUTS SDs high: not the default.
    With ``correlated_plates=("plant",)`` and the level in ``exact_levels`` as well, every
    population scalar of that comparison is within 0.41 NUTS SDs (docs/svi.md).
    """

    def __init__(
        self,
        model: Callable,
        data: NLMEData,
        structure: ModelStructure,
        use_markers: bool = True,
        hidden: int = 64,
        marker_hidden: int = 32,
        init_scale: float = 0.05,
        coupled_sites: Sequence[str] = (),
        init_loc_fn: Callable = init_to_prior_median,
        anchors: dict[str, Anchor] | None = None,
        correlated_events: bool = False,
        exact_levels: Sequence[str] = (),
        correlated_plates: Sequence[str] = (),
        model_kwargs: dict | None = None,
        variety_offsets: bool = False,
    ):
        super().__init__()
        self.model = model
        self.coupled_sites = {name: structure.population[name] for name in coupled_sites}
        self.population = AutoNormal(
            poutine.block(model, expose=list(structure.population)),
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
        )
        unknown = set(exact_levels) - set(structure.individual)
        if unknown:
            raise ValueError(f"exact levels {sorted(unknown)} are not individual-level sites")
        self.exact_levels = [
            exact_level(model, data, structure.individual[name], model_kwargs or {})
            for name in exact_levels
        ]
        self.layouts = []
        offset = n_correlations = 0
        for info in structure.individual.values():
            if info.name in exact_levels:
                continue
            layout = _SiteLayout(info, offset, n_correlations, correlated_events, correlated_plates)
            self.layouts.append(layout)
            offset += layout.size
            n_correlations += layout.n_correlations
        self.use_markers = use_markers and data.markers is not None
        self.marker_features = (
            marker_features(data.markers, data.times.dtype).to(data.device)
            if self.use_markers
            else None
        )
        encoder = VarietyEncoder(
            n_marker_features=data.n_varieties if self.use_markers else 0,
            n_features=trajectory_features(data.subset([0])).shape[-1],
            output_dim=offset,
            hidden=hidden,
            marker_hidden=marker_hidden,
            init_scale=init_scale,
            n_correlations=n_correlations,
        ).to(data.device)
        to_pyro_module_(encoder)
        self.encoder = encoder
        n_coupled = sum(
            math.prod(biject_to(info.support).inv.forward_shape(info.shape))
            for info in self.coupled_sites.values()
        )
        self.coupling = PyroParam(
            torch.zeros(offset, n_coupled, dtype=data.times.dtype, device=data.device)
        )
        self.init_loc_fn = init_loc_fn
        self.anchors = dict(anchors or {})
        self.init_scale = init_scale
        self.prior_gain = PyroParam(torch.ones(offset, dtype=data.times.dtype, device=data.device))
        self.variety_offsets = variety_offsets
        if variety_offsets:
            zeros = data.times.new_zeros(data.n_varieties, offset)
            self.loc_offset, self.log_scale_offset = PyroParam(zeros), PyroParam(zeros.clone())
        self._reference: _Reference | None = None

    def reference(self, data: NLMEData, model_kwargs: dict) -> _Reference:
        """Per real-valued individual site, at the initial population values: its conditional
        prior mean ``[V, *site shape]``; the origin of its location ``[V, *site shape]`` (the
        anchor's location if given, else that prior mean); the unit of the encoder's location
        output, its conditional prior SD averaged over varieties ``[1, *site shape]``; the
        unit of the encoder's scale output ``[V or 1, *site shape]``, chosen so that the initial
        scale is the anchor's SD (else ``init_scale`` location units); and the prior's share of
        each coordinate's conditional precision at the anchor, ``w = prior precision /
        Anchor.precision`` in ``[0, 1]`` ``[V or 1, *site shape]`` (1 without an anchor, or
        where the precision is not positive). For a Gaussian coordinate given the others, ``w``
        is the slope of its posterior mean in its prior mean (on a simulated 60-variety design,
        5-95% quantiles: 0.07-0.54 for the plants' curve parameters, 0.11 for the variety x
        scenario ones). Computed once, from the initial values alone (the anchor's, not the
        fitted, random-effect SDs), so a resumed run uses the same."""
        if self._reference is None:
            with torch.random.fork_rng(devices=[]), poutine.block(), PriorMeans():
                trace = poutine.trace(InitMessenger(self.init_loc_fn)(self.model)).get_trace(
                    data, **model_kwargs
                )
            reference = _Reference({}, {}, {}, {}, {})
            for layout in self.layouts:
                if not layout.prior_relative:
                    continue
                name, prior = layout.name, trace.nodes[layout.name]["fn"]
                prior_mean = prior.mean.detach()
                unit = prior.stddev.mean(0, keepdim=True).detach()
                reference.prior_mean[name], reference.unit[name] = prior_mean, unit
                reference.origin[name], reference.scale_unit[name] = prior_mean, unit
                reference.prior_share[name] = torch.ones_like(unit)
                if name in self.anchors:
                    anchor = self.anchors[name]
                    reference.origin[name] = anchor.loc
                    reference.scale_unit[name] = torch.where(
                        anchor.sd.isfinite(), anchor.sd / self.init_scale, unit
                    )
                    share = prior.stddev.detach() ** -2 / anchor.precision
                    reference.prior_share[name] = torch.where(
                        anchor.precision > 0, share.clamp(0.0, 1.0), 1.0
                    )
            self._reference = reference
        return self._reference

    def standardized_deviation(self, population: dict) -> torch.Tensor:
        """``[D]``: the coupled sites' draws as ``(u - loc) / scale`` on the unconstrained
        scale of the population guide, concatenated (the draws' standard normal noise)."""
        parts = []
        for name, info in self.coupled_sites.items():
            loc, scale = self.population._get_loc_and_scale(name)
            unconstrained = biject_to(info.support).inv(population[name])
            parts.append(((unconstrained - loc) / scale).reshape(-1))
        return torch.cat(parts) if parts else self.coupling.new_zeros(0)

    def conditional_prior(
        self, data: NLMEData, idx: torch.Tensor, population: dict, model_kwargs: dict
    ) -> tuple[dict[str, dist.Distribution], torch.Tensor | None]:
        """Run the model (hidden from the guide's trace) on the batch ``idx`` given the
        population draws, with individual latents at their conditional prior means.

        :returns: per individual site its conditional prior, and the ``curve`` there
            (None if the model has no ``curve`` site).
        """
        conditioned = poutine.condition(self.model, data={**population, VARIETY_PLATE: idx})
        with poutine.block(), PriorMeans():
            trace = poutine.trace(conditioned).get_trace(data, **model_kwargs)
        prior = {name: trace.nodes[name]["fn"] for name in self.individual_sites}
        curve = trace.nodes.get(CURVE_SITE)
        return prior, None if curve is None else curve["value"]

    @staticmethod
    def _sample_joint_cells(layout, loc, scale, correlations, reference, inner_plates):
        """One Gaussian per cell jointly over its plates in ``layout.joint_axes`` and its
        event (e.g. all plants of a variety x scenario, all their curve parameters), sampled
        as the auxiliary site ``_{name}_joint`` outside those plates; the site itself is its
        reshaped value (a ``Delta``). Real-valued sites only (locations are unconstrained)."""
        cells = layout.to_cells(loc)
        block = slice(layout.correlation_offset, layout.correlation_offset + layout.n_correlations)
        tril = _cholesky_factor(
            layout.to_cells(scale),
            correlations[:, block].reshape(cells.shape[:-1] + (-1,)),
            layout.to_cells(reference.unit[layout.name].expand_as(loc)),
            layout.tril_rows,
            layout.tril_cols,
        )
        joint_plates = {
            name for name, _, dim in layout.inner_plates if dim - 1 in layout.joint_axes
        }
        with contextlib.ExitStack() as stack:
            for name, _, _ in layout.inner_plates:
                if name not in joint_plates:
                    stack.enter_context(inner_plates[name])
            joint = pyro.sample(
                f"_{layout.name}_joint",
                CholeskyNormal(cells, scale_tril=tril),
                infer={"is_auxiliary": True},
            )
        with contextlib.ExitStack() as stack:
            for name, _, _ in layout.inner_plates:
                stack.enter_context(inner_plates[name])
            return pyro.sample(
                layout.name, dist.Delta(layout.from_cells(joint), event_dim=layout.event_dim)
            )

    @property
    def individual_sites(self) -> list[str]:
        return [layout.name for layout in self.layouts] + [
            level.layout.name for level in self.exact_levels
        ]

    @staticmethod
    def exact_conditional(level: ExactLevel, prior: dict, values: dict) -> dist.Normal:
        """``p(level | population, child)``: with prior ``Normal(m, s)`` and the child's
        ``Normal(level, t)`` (summed over ``sum_dims``), ``Normal((m / s^2 + sum c / t^2) / P,
        P^-1/2)``, ``P = 1 / s^2 + sum 1 / t^2``; batch shape of the level's value."""
        own = base_distribution(prior[level.layout.name])
        child = base_distribution(prior[level.child])
        child_precision = (child.scale**-2).expand(values[level.child].shape)
        precision = own.scale**-2 + child_precision.sum(level.sum_dims, keepdim=True)
        weighted = (values[level.child] * child_precision).sum(level.sum_dims, keepdim=True)
        return dist.Normal((own.loc * own.scale**-2 + weighted) / precision, precision.rsqrt())

    def forward(self, data: NLMEData, subsample_size: int | None = None, **model_kwargs):
        values = dict(self.population(data, subsample_size=subsample_size, **model_kwargs))
        if subsample_size is None:
            idx = torch.arange(data.n_varieties, device=data.device)
        else:
            idx = torch.randperm(data.n_varieties, device=data.device)[:subsample_size]
        prior, prior_curve = self.conditional_prior(data, idx, values, model_kwargs)
        reference = self.reference(data, model_kwargs)
        batch = data.subset(idx)
        markers = self.marker_features[idx] if self.use_markers else None
        loc, scale, correlations = self.encoder(markers, trajectory_features(batch, prior_curve))
        if self.variety_offsets:
            loc = loc + self.loc_offset[idx]
            scale = scale * self.log_scale_offset[idx].exp()
        coupled = self.coupling @ self.standardized_deviation(values)
        # One plate object per name: a plate is a sample site, created once per guide call.
        layouts = self.layouts + [level.layout for level in self.exact_levels]
        plate_specs = {spec for layout in layouts for spec in layout.inner_plates}
        inner_plates = {name: pyro.plate(name, size, dim=dim) for name, size, dim in plate_specs}
        with pyro.plate(VARIETY_PLATE, data.n_varieties, subsample=idx, dim=VARIETY_DIM):
            for layout in self.layouts:
                block = slice(layout.offset, layout.offset + layout.size)
                shape = (len(idx),) + layout.unconstrained_shape
                site_loc = loc[:, block].reshape(shape)
                site_scale = scale[:, block].reshape(shape)
                site_coupled = coupled[block].reshape(layout.unconstrained_shape)
                if layout.prior_relative:
                    name = layout.name
                    share = _rows(reference.prior_share[name], idx)
                    gain = self.prior_gain[block].reshape(layout.unconstrained_shape)
                    shift = prior[name].mean - reference.prior_mean[name][idx]
                    site_loc = (
                        reference.origin[name][idx]
                        + share * gain * shift
                        + reference.unit[name] * (site_loc + share * site_coupled)
                    )
                    site_scale = _rows(reference.scale_unit[name], idx) * site_scale
                else:
                    site_loc = site_loc + site_coupled
                if layout.joint_axes:
                    values[layout.name] = self._sample_joint_cells(
                        layout, site_loc, site_scale, correlations, reference, inner_plates
                    )
                    continue
                if layout.correlated:
                    correlation_block = slice(
                        layout.correlation_offset,
                        layout.correlation_offset + layout.n_correlations,
                    )
                    factor = CholeskyNormal(
                        site_loc,
                        scale_tril=_cholesky_factor(
                            site_scale,
                            correlations[:, correlation_block].reshape(shape[:-1] + (-1,)),
                            reference.unit[layout.name],
                            layout.tril_rows,
                            layout.tril_cols,
                        ),
                    )
                else:
                    factor = dist.Normal(site_loc, site_scale).to_event(layout.event_dim)
                posterior = dist.TransformedDistribution(factor, layout.transform.with_cache())
                with contextlib.ExitStack() as stack:
                    for name, _, _ in layout.inner_plates:
                        stack.enter_context(inner_plates[name])
                    values[layout.name] = pyro.sample(layout.name, posterior)
            for level in self.exact_levels:
                conditional = self.exact_conditional(level, prior, values)
                with contextlib.ExitStack() as stack:
                    for name, _, _ in level.layout.inner_plates:
                        stack.enter_context(inner_plates[name])
                    values[level.layout.name] = pyro.sample(
                        level.layout.name, conditional.to_event(level.layout.event_dim)
                    )
        return values
