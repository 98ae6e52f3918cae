"""Coordinate-ascent updates of spike-and-slab marker effects inside SVI.

Mean-field SVI by Adam does not find a few QTL among 60,000 markers under a sparse prior
(docs/marker_priors.md): every effect moves by about the learning rate a step whatever its
evidence, and the genetic SD collapses before the QTL grow. The spike-and-slab effects are,
however, conditionally conjugate. When a centred Normal site of the model (the *response*, e.g.
g2was's ``variety_scenario_parameter`` in its centred form) has a location linear in them,

    response[v, ..., k] ~ Normal(offset[v, ..., k] + unit[k] * Z[v] @ b[:, k], scale[v, ..., k]),

the optimal mean-field factor of each effect given the rest of the guide is the exact
two-component posterior of a Gaussian regression (Carbonetto & Stephens 2012, Bayesian Anal.
7, 73, with a Gaussian spike instead of a point mass)::

    d[m, k] = unit[k] ** 2 * sum_v w[v, k] Z[v, m] ** 2
    r[m, k] = unit[k] * sum_v w[v, k] Z[v, m] (y[v, k] - fit_without_m[v, k])
    var_c = 1 / (d + 1 / prior_sd_c ** 2),   loc_c = var_c * r          (c: spike or slab)
    logit alpha = logit pi + sum over the indicator's curve parameters of
                  [log(sd_slab / prior_sd_slab) + loc_slab ** 2 / (2 var_slab)] - [same, spike]
    q(b[m, k]) = alpha N(loc_slab, var_slab) + (1 - alpha) N(loc_spike, var_spike)

with the working response ``y[v, k]`` and weights ``w[v, k]`` the precision-weighted mean of
``response - offset`` over the variety's scenarios (and any other dims) and its total
precision, and ``logit pi`` replaced by ``E_q[logit pi]`` under ``q(pi) = Beta(c1 + sum_m
alpha_m, c0 + sum_m (1 - alpha_m))``, the exact factor of the prior ``pi ~ Beta(c1, c0)``.
This module holds both factors and updates them every few SVI steps from the guide's current
medians of the other sites; Adam fits everything else. The ELBO being maximised is the same:
only the marker block is maximised by coordinate ascent instead of gradient steps.

Effects whose prior is Gaussian given the other sites, ``b[m, k] ~ Normal(0, s[m, k])`` (the
ridge prior, ``s`` from the genetic SD; the regularised horseshoe, ``s`` from the global, local
and slab scales), have a Gaussian optimal factor: the exact posterior of the working
regression, jointly over all markers
(:class:`~pyro_nlme.infer.guides.gaussian_regression.GaussianRegressionPosterior`, ``V x V``
algebra only), the prior SDs ``s`` at the guide's medians of their scales. The *global* scale
of these priors (the ridge's genetic SD, the horseshoe's global scale: the site whose square
multiplies every prior variance, :func:`global_scale_site`) is not fitted by Adam but set at
each update, before the factor, to the Laplace approximation of its posterior with the effects
integrated out of the working regression
(:meth:`~pyro_nlme.infer.guides.gaussian_regression.GaussianRegressionPosterior.log_scale_posterior`);
the effects' factor is then conditional on its draw, ``q(s) q(b | s)``. Fitted by Adam against
a factor built at its current value, the scale barely moved: 60,000 effects pin it with a
curvature of about ``2 M`` in ``log s``, against ``O(V)`` from the data; on the sparse-QTL
design the ridge's genetic SD of the inflection stayed at 2.8-3.1, about three times the truth,
over 1,000 steps (docs/marker_priors.md). The horseshoe's *local* scales (one per marker,
:func:`local_scale_site`) are not fitted by Adam either: after the effects' factor, each update
sets each one's factor to the log-normal with the mean and SD of ``log lambda`` under its prior
times the marginal likelihood of its effect's prior variance, every effect integrated out
(:meth:`GaussianCoordinateAscent.update`). Adam fits the slab. The mean-field factor
``p(lambda) exp(E_q[log p(b | lambda)])`` was used first: each local scale then sees one effect,
shrunk by the joint posterior of 60,000 markers on 200 varieties far below what its data say,
and moves little per update (the global scale's pinning, per marker); on the sparse-QTL design
the QTL's mean ``log lambda`` stayed within 0.1 of the other markers' (docs/marker_priors.md).
With the horseshoe's ``tau0`` of about 1e-6 and every effect moved by Adam, no effect grew out
of the prior (docs/sparse_qtl_benchmark_horseshoe.md): here each update sets the effects to
their conditional posterior given the current scales. A mean-field factor (one Normal per
marker) is not used for them: its draws of ``Z @ b`` carry the sum of 60,000
marginal variances, which the response's SD then absorbed; under the horseshoe that widened the
prior SDs in turn, and the fit blew up (docs/marker_priors.md).

Approximations, on top of the mean-field family (across sites): the other sites enter at their
guide medians (their guide means for Normal sites; for the scales ``1 / median ** 2`` stands
for ``E[1 / scale ** 2]``, which it underestimates by a Jensen gap; the spike-and-slab's
genetic SD, which sets its prior SDs, enters at its median: a variational-EM step for it); the
global scale's Laplace posterior holds the horseshoe's slab at the current scales within an
update; the local scales' factors are log-normals with the moments of ``log lambda`` under the
prior times the marginal likelihood, each given the other local scales at the value where
``lambda ** -2`` is its factor's expectation and the global scale at its median (a collapsed
update, as for the global scale: not the mean-field optimum, and the ELBO is not monotone in
it); and the spike-and-slab's markers ``n_blocks`` apart are updated together, each as if
alone, with the block's step damped by an exact line search
(:meth:`SpikeSlabFactor._update_block`), rather than one at a time; the fixed points are the
same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.poutine.util import site_is_subsample

from pyro_nlme.data import GenotypeMatrix, NLMEData
from pyro_nlme.infer.guides.gaussian_regression import (
    GaussianRegressionPosterior,
    single_effect_log_evidence,
)
from pyro_nlme.infer.util import base_distribution, sites_moved_by, trace_model, trace_until
from pyro_nlme.model.convention import VARIETY_DIM
from pyro_nlme.model.marker_priors import MARKER_PLATE, SpikeSlabNormal

DEFAULT_BLOCKS = 256
"""Markers ``m, m + 256, m + 512, ...`` are updated together (235 per block at 60,000)."""
LINEARITY_TOLERANCE = 1e-3
"""Largest departure of the response's location from ``offset + unit * Z @ b``, relative to
the probed change (float32 rounding is about 1e-6)."""
PROBE_MARKERS = 8
"""Markers set to 1 when the response's change per unit effect is measured."""


def _inclusion_site(trace, prior: SpikeSlabNormal) -> tuple[str, tuple[torch.Tensor, ...]]:
    """The Beta site whose draw is the mixture's inclusion probability, and its prior
    concentrations ``(c1, c0)``."""
    storage = prior.inclusion.untyped_storage().data_ptr()
    for name, node in trace.nodes.items():
        fn = base_distribution(node["fn"]) if node["type"] == "sample" else None
        if isinstance(fn, dist.Beta) and node["value"].untyped_storage().data_ptr() == storage:
            return name, (fn.concentration1.detach(), fn.concentration0.detach())
    raise ValueError(
        "coordinate-ascent marker updates need the spike-and-slab inclusion probability "
        "to be a Beta site of the model"
    )


def marker_effect_site(trace: poutine.Trace) -> str:
    """The name of the marker-effect site of a model's trace: the latent site in the marker
    plate whose prior is a :class:`SpikeSlabNormal` or a ``Normal`` (given its scales).

    :raises ValueError: if the model has none or several.
    """
    names = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and any(frame.name == MARKER_PLATE for frame in site["cond_indep_stack"])
        and type(base_distribution(site["fn"])) in (SpikeSlabNormal, dist.Normal)
    ]
    if len(names) != 1:
        raise ValueError(
            "coordinate-ascent marker updates need exactly one marker-effect site with a "
            "spike-and-slab or (conditionally) Gaussian prior in the model's marker plate "
            f"(marker_prior='ridge', 'horseshoe' or 'spike_slab'), found {names}"
        )
    return names[0]


def _positive_latent_sites(trace: poutine.Trace, site: str, in_marker_plate: bool):
    """``(name, node)`` of the positive latent sites of ``trace`` other than ``site``, inside or
    outside the marker plate."""
    for name, node in trace.nodes.items():
        if (
            node["type"] == "sample"
            and not node["is_observed"]
            and not site_is_subsample(node)
            and name != site
            and any(frame.name == MARKER_PLATE for frame in node["cond_indep_stack"])
            == in_marker_plate
            and base_distribution(node["fn"]).support
            in (constraints.positive, constraints.nonnegative)
        ):
            yield name, node


SCALE_PROBE_TOLERANCE = 1e-3
"""Relative tolerance of the checks of :func:`global_scale_site`."""


def global_scale_site(
    model: Callable, data: NLMEData, trace: poutine.Trace, site: str, model_kwargs: dict
) -> str | None:
    """The latent site ``s [K]`` (``K`` the effects' last dim) whose square multiplies the
    prior variance of the Gaussian effects ``site`` for (almost) every marker, and that no
    other site depends on: the ridge's genetic SD, the horseshoe's global scale (whose slab
    caps a few large effects). ``None`` if the model has none.

    Each positive ``[K]`` site outside the marker plate is probed by doubling it in
    ``trace``: the effects' prior variance must quadruple for at least half of the markers of
    each curve parameter, and the log-density of every other site must not change. Its prior
    must not depend on other latent sites (checked against a second trace of the model).
    """
    kwargs = {"subsample_size": None, **model_kwargs}
    values = trace.nodes[site]["value"]
    variance = base_distribution(trace.nodes[site]["fn"]).scale.detach() ** 2
    for name, node in _positive_latent_sites(trace, site, in_marker_plate=False):
        if node["value"].shape != values.shape[-1:]:
            continue
        probe, dependent = sites_moved_by(
            model, data, trace, {name: 2 * node["value"]}, kwargs, SCALE_PROBE_TOLERANCE
        )
        ratio = base_distribution(probe.nodes[site]["fn"]).scale.detach() ** 2 / variance
        quadrupled = ((ratio - 4).abs() < 4 * SCALE_PROBE_TOLERANCE).float()
        if (quadrupled.expand(values.shape).mean(0) < 0.5).any() or set(dependent) != {site}:
            continue
        other = trace_model(model, data, **kwargs).nodes[name]["fn"]
        if not torch.allclose(other.log_prob(node["value"]), node["fn"].log_prob(node["value"])):
            raise ValueError(
                f"the prior of the global scale {name!r} of {site!r} depends on other latent "
                "sites: coordinate-ascent marker updates need it fixed"
            )
        return name
    return None


def local_scale_site(
    model: Callable, data: NLMEData, trace: poutine.Trace, site: str, model_kwargs: dict
) -> str | None:
    """The latent site ``lambda`` ``[M, K]`` or ``[M]`` (one per marker for all curve
    parameters) of the marker plate that sets each effect's prior SD and that no other site
    depends on: the horseshoe's local scales. ``None`` if the model has none.

    Each positive site of the marker plate is probed by doubling it in ``trace``: only the
    log-density of ``site`` may change. Its prior must be elementwise (univariate).
    """
    kwargs = {"subsample_size": None, **model_kwargs}
    n_markers = trace.nodes[site]["value"].shape[0]
    for name, node in _positive_latent_sites(trace, site, in_marker_plate=True):
        if node["value"].shape[0] != n_markers or node["value"].dim() > 2:
            continue
        _, dependent = sites_moved_by(
            model, data, trace, {name: 2 * node["value"]}, kwargs, SCALE_PROBE_TOLERANCE
        )
        if set(dependent) != {site}:
            continue
        if base_distribution(node["fn"]).event_shape:
            raise ValueError(
                f"the prior of the local scales {name!r} of {site!r} is not elementwise: "
                "coordinate-ascent marker updates need one univariate prior per scale"
            )
        return name
    return None


LOG_SCALE_RANGE = (-40.0, 60.0)
"""Where :func:`log_scale_moments` looks for the mass of ``log lambda`` first."""


@torch.no_grad()
def log_scale_moments(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    shape: torch.Size,
    dtype: torch.dtype = torch.float64,
    points: int = 49,
    stages: int = 3,
    drop: float = 15.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and SD of ``x`` under many independent one-dimensional densities ``∝
    exp(log_density(x))``, by quadrature on grids that close in on each one's mass.

    ``log_density(x)`` maps a tensor ``x`` of ``shape`` to unnormalised log-densities of the same
    shape, element ``i`` depending on ``x[i]`` only. The first grid has ``points`` points over
    :data:`LOG_SCALE_RANGE`; each next one spans, per element, the points of the previous grid
    within ``drop`` nats of its maximum, padded by one spacing. The moments are those of the
    last grid's normalised weights.

    The horseshoe's local scales need this rather than a Laplace approximation: their
    densities are skewed (the prior's tail ``exp(-x)`` on one side, the data's on the other),
    and under the mean-field update the factor of a marker the data barely inform was a
    plateau (a curvature of about 0.002 at the mode, an SD of 20) on which Newton's steps in
    float32 did not converge.

    :returns: ``(mean, sd)``, each of ``shape``.
    :raises ValueError: if an element's mass reaches an end of :data:`LOG_SCALE_RANGE`.
    """
    lower = torch.full(shape, LOG_SCALE_RANGE[0], dtype=dtype)
    upper = torch.full(shape, LOG_SCALE_RANGE[1], dtype=dtype)
    fractions = torch.linspace(0, 1, points, dtype=dtype).reshape(-1, *(1,) * len(shape))
    for stage in range(stages):
        grid = lower + fractions * (upper - lower)  # [points, *shape]
        values = torch.stack([log_density(x) for x in grid]).to(dtype)
        kept = values > values.max(0).values - drop
        if stage == 0 and (kept[0] | kept[-1]).any():
            raise ValueError(
                f"the mass of {int((kept[0] | kept[-1]).sum())} log scales reaches an end of "
                f"{LOG_SCALE_RANGE}"
            )
        spacing = (upper - lower) / (points - 1)
        first = kept.to(torch.uint8).argmax(0, keepdim=True)
        last = points - 1 - kept.flip(0).to(torch.uint8).argmax(0, keepdim=True)
        lower = torch.maximum(grid.gather(0, first)[0] - spacing, lower)
        upper = torch.minimum(grid.gather(0, last)[0] + spacing, upper)
    weights = torch.softmax(values, 0)
    mean = (weights * grid).sum(0)
    return mean, (weights * (grid - mean) ** 2).sum(0).sqrt()


class MarkerCoordinateAscent:
    """Guide part for the marker-effect site ``site`` ``[M, K]`` (marker plate, dim -1), fitted
    by :meth:`update` (module docstring), not by gradients. Its state lives in Pyro's parameter
    store (saved and restored with a checkpoint) under ``{site}.cavi_*``; Adam sees no
    gradient for it. Subclasses hold the factor of a prior family.

    :param model: the (reparametrised) model the SVI fits.
    :param trace: a trace of ``model`` on the full data.
    :param site: the marker-effect site (:func:`marker_effect_site`).
    :param response_site: the centred Normal site whose location is linear in the effects.
    :param medians: ``medians(data, **kwargs)``: the guide's medians of every other latent site
        (e.g. ``AutoNormal.median``).
    :param marker_plate: returns the guide's open marker plate (a guide list opens the
        model's plates once for all its parts).
    :param sweeps: coordinate-ascent sweeps over all markers per :meth:`update`.
    :param n_blocks: markers updated at once are ``n_blocks`` apart.
    """

    hidden_sites: tuple[str, ...] = ()
    """Further sites this part samples (besides ``site``)."""

    def __init__(
        self,
        model: Callable,
        trace: poutine.Trace,
        site: str,
        response_site: str,
        medians: Callable[..., dict],
        marker_plate: Callable[[], pyro.plate],
        sweeps: int = 2,
        n_blocks: int = DEFAULT_BLOCKS,
    ):
        self.model, self.site, self.response_site = model, site, response_site
        self.marker_plate = marker_plate
        self.medians, self.sweeps, self.n_blocks = medians, sweeps, n_blocks
        response = trace.nodes.get(response_site, {})
        if response.get("type") != "sample":
            raise ValueError(
                f"coordinate-ascent marker updates: the model has no site {response_site!r} "
                "(g2was: parametrization='centred' has 'variety_scenario_parameter')"
            )
        if type(base_distribution(response["fn"])) is not dist.Normal:
            raise ValueError(
                f"coordinate-ascent marker updates need {response_site!r} to be Normal, "
                f"got {type(base_distribution(response['fn'])).__name__}"
            )
        self.shape = trace.nodes[site]["value"].shape

    def _point(self, point: dict) -> dict:
        """The values of the other sites the working regression is read at."""
        return point

    def _fit(self, markers: GenotypeMatrix, regression: WorkingRegression) -> None:
        """Move the marker factor towards (or to) its optimum given ``regression``."""
        raise NotImplementedError

    def update(self, data: NLMEData, **model_kwargs) -> None:
        """Update the marker factor given the other sites at their guide medians."""
        point = self._point(self.medians(data, subsample_size=None, **model_kwargs))
        regression = working_regression(
            self.model, data, self.site, self.shape, self.response_site, point, model_kwargs
        )
        self._fit(data.markers, regression)


class SpikeSlabCoordinateAscent(MarkerCoordinateAscent):
    """``q(b) = prod SpikeSlabNormal(loc_spike, sd_spike, loc_slab, sd_slab, alpha)`` and the
    exact factor of the inclusion probability (:class:`SpikeSlabFactor`)."""

    def __init__(self, model: Callable, trace: poutine.Trace, site: str, *args, **kwargs):
        super().__init__(model, trace, site, *args, **kwargs)
        prior = base_distribution(trace.nodes[site]["fn"])
        self.shared = prior.shared
        self.inclusion_site, self.inclusion_prior = _inclusion_site(trace, prior)
        self.hidden_sites = (self.inclusion_site,)
        value = trace.nodes[site]["value"]
        alpha = prior.inclusion.detach().expand(value.shape[:1] if self.shared else value.shape)
        self._names = {part: f"{site}.cavi_{part}" for part in ("alpha", "loc", "var")}
        pyro.param(self._names["alpha"], alpha.clone())
        pyro.param(self._names["loc"], torch.zeros((2, *value.shape), dtype=value.dtype))
        variance = torch.stack([prior.spike_scale, prior.slab_scale]).detach() ** 2
        pyro.param(self._names["var"], variance.expand(2, *value.shape).clone())

    def factor(self) -> SpikeSlabFactor:
        """The current factor (index 0 of ``loc`` and ``var``: spike, 1: slab)."""
        alpha, loc, var = (
            pyro.param(self._names[part]).detach() for part in ("alpha", "loc", "var")
        )
        return SpikeSlabFactor(alpha, loc, var, self.shared, self.inclusion_prior)

    def __call__(self, data: NLMEData, *args, **kwargs) -> dict[str, torch.Tensor]:
        factor = self.factor()
        inclusion, posterior = factor.inclusion_posterior(), factor.posterior()
        inclusion = pyro.sample(
            self.inclusion_site, inclusion if self.shared else inclusion.to_event(1)
        )
        with self.marker_plate():
            value = pyro.sample(self.site, posterior if self.shared else posterior.to_event(1))
        return {self.inclusion_site: inclusion, self.site: value}

    def _point(self, point: dict) -> dict:
        return {**point, self.inclusion_site: self.factor().inclusion_posterior().mean}

    def _fit(self, markers: GenotypeMatrix, regression: WorkingRegression) -> None:
        """``sweeps`` blocked coordinate-ascent sweeps over the markers."""
        self.factor().ascend(markers, regression, self.sweeps, self.n_blocks)


class GaussianCoordinateAscent(MarkerCoordinateAscent):
    """For effects with a Gaussian prior given their scales, ``q(b)`` is the exact joint
    posterior of the working regression
    (:class:`~pyro_nlme.infer.guides.gaussian_regression.GaussianRegressionPosterior`), set
    whole by each update; until the first, the prior at the model trace's scales. Its state
    is the regression, ``{site}.cavi_{response, weight, unit, prior_variance}``; the
    posterior is rebuilt (one ``V x V`` Cholesky per curve parameter) when that changes.

    With ``scale_site`` (:func:`global_scale_site`), that site's factor is
    ``LogNormal({site}.cavi_scale_loc, {site}.cavi_scale_sd)``, set by each update to the
    Laplace approximation of its posterior with the effects integrated out (module
    docstring), and ``q(b | s)`` is the factor with the prior variances
    ``(s / {site}.cavi_scale_reference) ** 2 * prior_variance``.

    With ``local_site`` (:func:`local_scale_site`: the horseshoe's ``lambda``), that site's
    factor is ``LogNormal({site}.cavi_local_loc, {site}.cavi_local_sd)``, one per scale, set
    after the effects' factor by each update to the mean and SD of ``log lambda`` under
    ``p(lambda) p(y | sd(lambda) ** 2)`` (:func:`log_scale_moments`), the marginal likelihood
    of its effect's prior variance with every effect integrated out
    (:meth:`~pyro_nlme.infer.guides.gaussian_regression.GaussianRegressionPosterior.marker_evidence`),
    the other scales where the effects' factor was built. The working regression reads the
    prior variances at ``lambda = exp(loc - sd ** 2)``, where ``lambda ** -2`` is its
    expectation under the factor.

    :param scale_site: the global scale site, or ``None``.
    :param scale_init: ``[K]`` its initial median (e.g. from the guide's ``init_loc_fn``).
    :param scale_init_sd: the initial SD of its log (and of the local scales' logs).
    :param local_site: the local scale site, or ``None``.
    :param local_init: its initial medians, shaped like the site.
    """

    _parts = ("response", "weight", "unit", "prior_variance")
    _scale_parts = ("scale_loc", "scale_sd", "scale_reference")
    _local_parts = ("local_loc", "local_sd")

    def __init__(
        self,
        model: Callable,
        trace: poutine.Trace,
        site: str,
        *args,
        scale_site: str | None = None,
        scale_init: torch.Tensor | None = None,
        scale_init_sd: float = 0.1,
        local_site: str | None = None,
        local_init: torch.Tensor | None = None,
        **kwargs,
    ):
        super().__init__(model, trace, site, *args, **kwargs)
        prior = base_distribution(trace.nodes[site]["fn"])
        value = trace.nodes[site]["value"]
        response = trace.nodes[self.response_site]
        n_varieties = _per_variety(response["value"], response["fn"].event_dim).shape[0]
        zeros = torch.zeros(n_varieties, value.shape[-1], dtype=value.dtype)
        parts = (*self._parts, *self._scale_parts, *self._local_parts)
        self._names = {part: f"{site}.cavi_{part}" for part in parts}
        pyro.param(self._names["response"], zeros.clone())
        pyro.param(self._names["weight"], zeros.clone())  # weight 0: the prior
        pyro.param(self._names["unit"], torch.ones_like(value[0]))
        variance = (prior.scale.detach() ** 2).expand(value.shape).clone()
        pyro.param(self._names["prior_variance"], variance)
        self.scale_site, self.scale_prior = scale_site, None
        if scale_site is not None:
            self.hidden_sites = (scale_site,)
            self.scale_prior = base_distribution(trace.nodes[scale_site]["fn"])
            reference = trace.nodes[scale_site]["value"].detach()
            pyro.param(self._names["scale_loc"], scale_init.detach().log().clone())
            pyro.param(self._names["scale_sd"], torch.full_like(reference, scale_init_sd))
            pyro.param(self._names["scale_reference"], reference.clone())
        self.local_site = local_site
        if local_site is not None:
            self.hidden_sites = (*self.hidden_sites, local_site)
            pyro.param(self._names["local_loc"], local_init.detach().log().clone())
            pyro.param(self._names["local_sd"], torch.full_like(local_init, scale_init_sd))
        self._cached: tuple[tuple, GaussianRegressionPosterior] | None = None

    def _state(self, parts) -> list[torch.Tensor]:
        return [pyro.param(self._names[part]).detach() for part in parts]

    def _key(self, markers: GenotypeMatrix) -> tuple:
        return (id(markers), *((x.data_ptr(), x._version) for x in self._state(self._parts)))

    def posterior(self, markers: GenotypeMatrix) -> GaussianRegressionPosterior:
        """The current factor at the scale's reference value (rebuilt only when its state or
        the markers changed)."""
        key = self._key(markers)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, GaussianRegressionPosterior(markers, *self._state(self._parts)))
        return self._cached[1]

    def scale_posterior(self) -> dist.LogNormal:
        """``q(s)``, batch shape ``[K]`` (only with a ``scale_site``)."""
        loc, sd = self._state(("scale_loc", "scale_sd"))
        return dist.LogNormal(loc, sd)

    def local_posterior(self) -> dist.LogNormal:
        """``q(lambda)``, batch shape that of the local scale site (only with a
        ``local_site``)."""
        return dist.LogNormal(*self._state(self._local_parts))

    def _point(self, point: dict) -> dict:
        if self.scale_site is not None:
            point = {**point, self.scale_site: self.scale_posterior().loc.exp()}
        if self.local_site is not None:
            loc, sd = self._state(self._local_parts)
            point = {**point, self.local_site: torch.exp(loc - sd**2)}
        return point

    def update(self, data: NLMEData, **model_kwargs) -> None:
        """The global scale's and the effects' factors, then the local scales' (class
        docstring)."""
        super().update(data, **model_kwargs)
        if self.local_site is None:
            return
        evidence = self.posterior(data.markers).marker_evidence()  # at the global scale's median
        log_density = self.local_log_density(data, *evidence, **model_kwargs)
        loc, sd = log_scale_moments(log_density, self._state(("local_loc",))[0].shape)
        for part, value in zip(self._local_parts, (loc, sd), strict=True):
            pyro.param(self._names[part]).detach().copy_(value)

    def local_log_density(
        self, data: NLMEData, precision: torch.Tensor, score: torch.Tensor, **model_kwargs
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The log-density of the local scales' factor in ``x = log lambda``, up to a
        constant, ``log p(lambda) + x + log p(y | sd(lambda) ** 2)`` elementwise (summed over
        the curve parameters for a shared scale): the effect's marginal likelihood
        (:func:`~pyro_nlme.infer.guides.gaussian_regression.single_effect_log_evidence` of
        ``precision, score [M, K]``), the other sites at the guide's medians. ``sd(lambda)`` is
        read off the model, run up to the effects' site only
        (:func:`~pyro_nlme.infer.util.trace_until`)."""
        point = self._point(self.medians(data, subsample_size=None, **model_kwargs))
        kwargs = {"subsample_size": None, **model_kwargs}

        def log_density(log_local: torch.Tensor) -> torch.Tensor:
            local = log_local.exp()
            conditioned = poutine.condition(self.model, data={**point, self.local_site: local})
            prefix, effect = trace_until(conditioned, self.site, data, **kwargs)
            prior = base_distribution(prefix.nodes[self.local_site]["fn"]).log_prob(local)
            variance = (base_distribution(effect).scale ** 2).expand(precision.shape)
            evidence = single_effect_log_evidence(precision, score, variance.to(precision))
            return prior + log_local + (evidence if local.dim() == 2 else evidence.sum(-1))

        return log_density

    def _fit(self, markers: GenotypeMatrix, regression: WorkingRegression) -> None:
        """Set the scale's factor (if any), then the effects' factor at its median."""
        posterior = GaussianRegressionPosterior(
            markers, *regression[:3], regression.prior_variance[0]
        )
        if self.scale_site is not None:
            reference = self.scale_posterior().loc.exp()  # the scale ``regression`` was read at
            loc, sd = posterior.log_scale_posterior(self.scale_prior, reference)
            posterior = posterior.rescaled(torch.exp(2 * (loc - reference.log())))
            for part, value in zip(self._scale_parts, (loc, sd, loc.exp()), strict=True):
                pyro.param(self._names[part]).detach().copy_(value)
        values = (*regression[:3], posterior.prior_variance)
        for part, value in zip(self._parts, values, strict=True):
            pyro.param(self._names[part]).detach().copy_(value)
        self._cached = (self._key(markers), posterior)

    def __call__(self, data: NLMEData, *args, **kwargs) -> dict[str, torch.Tensor]:
        posterior, values = self.posterior(data.markers), {}
        if self.scale_site is not None:
            scale = pyro.sample(self.scale_site, self.scale_posterior().to_event(1))
            (reference,) = self._state(("scale_reference",))
            posterior = posterior.rescaled((scale / reference) ** 2)
            values[self.scale_site] = scale
        if self.local_site is not None:
            local = self.local_posterior()
            with self.marker_plate():
                values[self.local_site] = pyro.sample(
                    self.local_site, local.to_event(len(local.batch_shape) - 1)
                )
        joint = pyro.sample(f"_{self.site}_joint", posterior, infer={"is_auxiliary": True})
        with self.marker_plate():
            values[self.site] = pyro.sample(self.site, dist.Delta(joint, event_dim=1))
        return values


class _BlockedAscent:
    """Sweeps of coordinate ascent over the markers, ``n_blocks`` apart updated together, shared
    by the factors; a factor defines :meth:`mean`, :meth:`_sweep_context` (what it fixes for
    a sweep) and :meth:`_update_block`."""

    @torch.no_grad()
    def ascend(
        self,
        markers: GenotypeMatrix,
        regression: WorkingRegression,
        sweeps: int = 2,
        n_blocks: int = DEFAULT_BLOCKS,
    ) -> None:
        """``sweeps`` sweeps of coordinate ascent over the markers, in place."""
        effects = self.mean()
        fitted = regression.unit * markers.standardized_matmul(effects)
        n_markers = effects.shape[0]
        for _ in range(sweeps):
            context = self._sweep_context()
            for start in range(min(n_blocks, n_markers)):
                block = torch.arange(start, n_markers, n_blocks, device=effects.device)
                z = markers.standardized_columns(block).to(fitted)  # [V, B]
                change = self._update_block(block, z, regression, context, fitted, effects)
                fitted += z @ (regression.unit * change)


@dataclass
class SpikeSlabFactor(_BlockedAscent):
    """Mean-field factor of spike-and-slab effects ``b [M, K]`` and of their prior inclusion
    probability ``pi``: ``q(b[m, k]) = alpha N(loc[1], var[1]) + (1 - alpha) N(loc[0],
    var[0])``, ``q(pi) = Beta(c1 + sum_m alpha_m, c0 + sum_m (1 - alpha_m))``.

    :ivar alpha: ``[M, K]`` (``[M]`` when ``shared``: one indicator per marker).
    :ivar loc: ``[2, M, K]`` component means (spike, slab).
    :ivar var: ``[2, M, K]`` component variances.
    :ivar inclusion_prior: ``(c1, c0)`` of the Beta prior of ``pi`` (``[K]``, or scalars).
    """

    alpha: torch.Tensor
    loc: torch.Tensor
    var: torch.Tensor
    shared: bool
    inclusion_prior: tuple[torch.Tensor, torch.Tensor]

    def posterior(self) -> SpikeSlabNormal:
        return SpikeSlabNormal(
            self.var[0].sqrt(),
            self.var[1].sqrt(),
            self.alpha,
            self.shared,
            spike_loc=self.loc[0],
            slab_loc=self.loc[1],
        )

    def inclusion_posterior(self) -> dist.Beta:
        """``q(pi)``: the exact coordinate-ascent factor given ``alpha``."""
        c1, c0 = self.inclusion_prior
        return dist.Beta(c1 + self.alpha.sum(0), c0 + (1 - self.alpha).sum(0))

    def mean(self) -> torch.Tensor:
        """``E_q[b]`` ``[M, K]``."""
        alpha = self.alpha[:, None] if self.shared else self.alpha
        return alpha * self.loc[1] + (1 - alpha) * self.loc[0]

    def _sweep_context(self) -> torch.Tensor:
        """``E_q[logit pi]`` of ``q(pi)`` as the sweep starts (updated between sweeps)."""
        inclusion = self.inclusion_posterior()
        return inclusion.concentration1.digamma() - inclusion.concentration0.digamma()

    def _update_block(self, block, z, regression, log_odds, fitted, effects) -> torch.Tensor:
        """Update markers ``block`` (standardised dosages ``z [V, B]``) in place given the
        prior log odds ``E_q[logit pi]``; return the change of their mean effects ``[B, K]``.

        Each marker's factor is first proposed as if the marker were alone in the block (exact
        coordinate ascent for uncorrelated markers). The inclusion probabilities and variances
        are set to the proposal; the component means move by the fraction ``eta [K]`` of their
        proposed change that maximises the ELBO along it (a quadratic in ``eta``), clamped to
        ``[0, 1]``: 1 for uncorrelated markers. Markers far apart still correlate through
        population structure: with the full proposal (``eta = 1``) a block of 235 markers on
        the simulated design overshot and diverged within two updates. The fixed points are
        those of one-marker updates."""
        unit, weight = regression.unit, regression.weight
        precision = unit**2 * ((z**2).T @ weight)  # [B, K]
        old = effects[block]
        residual = unit * (z.T @ (weight * (regression.response - fitted))) + precision * old
        prior_var = regression.prior_variance  # [2, 1, K]
        var = 1.0 / (precision + 1.0 / prior_var)  # [2, B, K]
        loc = var * residual
        # log Bayes factor of slab against spike, (loc / var) ** 2 var / 2 = residual ** 2 var / 2
        evidence = 0.5 * (var[1] * prior_var[0] / (var[0] * prior_var[1])).log() + 0.5 * (
            residual**2
        ) * (var[1] - var[0])
        if self.shared:
            evidence = evidence.sum(-1)
        alpha = torch.sigmoid(evidence + log_odds)
        a = alpha[:, None] if self.shared else alpha
        weights = torch.stack([1 - a, a])  # [2, B, K]: q of each component
        start = self.loc[:, block]
        step = loc - start
        mean, mean_step = (weights * start).sum(0), (weights * step).sum(0)  # [B, K]
        remaining = regression.response - fitted - z @ (unit * (mean - old))
        moved = z @ (unit * mean_step)  # [V, K]
        slope = (
            (weight * remaining * moved).sum(0)
            - (precision * ((weights * start * step).sum(0) - mean * mean_step)).sum(0)
            - (weights * start * step / prior_var).sum((0, 1))
        )
        curvature = (
            (weight * moved**2).sum(0)
            + (precision * ((weights * step**2).sum(0) - mean_step**2)).sum(0)
            + (weights * step**2 / prior_var).sum((0, 1))
        )
        eta = torch.where(curvature > 0, slope / curvature, torch.ones_like(slope)).clamp(0, 1)
        loc = start + eta * step
        self.loc[:, block], self.var[:, block], self.alpha[block] = loc, var, alpha
        effects[block] = a * loc[1] + (1 - a) * loc[0]
        return effects[block] - old


class WorkingRegression(NamedTuple):
    """The Gaussian regression on markers the response site implies at the guide's medians."""

    response: torch.Tensor
    """``[V, K]`` precision-weighted mean of ``response - offset`` per variety."""
    weight: torch.Tensor
    """``[V, K]`` its precision."""
    unit: torch.Tensor
    """``[K]`` change of the response's location per unit of ``Z @ b``."""
    prior_variance: torch.Tensor
    """``[C, M or 1, K]`` prior variances of ``b``: spike and slab (``C = 2``, shared by the
    markers) or a Gaussian prior's (``C = 1``, per marker)."""


def _per_variety(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    """``[V, ..., K] -> [V, n, K]``: the variety dim first, the other batch dims flattened."""
    variety_axis = x.dim() - event_dims + VARIETY_DIM
    x = x.movedim(variety_axis, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def working_regression(
    model: Callable,
    data: NLMEData,
    site: str,
    shape: torch.Size,
    response_site: str,
    point: dict[str, torch.Tensor],
    model_kwargs: dict,
) -> WorkingRegression:
    """The regression of :class:`SpikeSlabCoordinateAscent` (module docstring), read off two
    traces of the model at ``point``, with the effects ``site`` (of ``shape``) at 0 and at 1 on
    a few markers (``PROBE_MARKERS``) far apart.

    :param point: a value of every other latent site (the guide's medians).
    :raises ValueError: if the response site's location is not ``offset + unit * Z @ b``.
    """
    kwargs = {"subsample_size": None, **model_kwargs}

    def trace_at(effects: torch.Tensor):
        conditioned = poutine.condition(model, data={**point, site: effects})
        return poutine.trace(conditioned).get_trace(data, **kwargs)

    dtype = next(iter(point.values())).dtype
    at_zero = trace_at(torch.zeros(shape, dtype=dtype))
    # probe: a unit effect at a few markers far apart (a sum over all 60,000 markers would
    # lose 1% to float32 rounding)
    columns = torch.arange(0, shape[0], max(shape[0] // PROBE_MARKERS, 1))
    probe = torch.zeros(shape, dtype=dtype)
    probe[columns] = 1.0
    at_probe = trace_at(probe)
    node = at_zero.nodes[response_site]
    fn = base_distribution(node["fn"])
    event_dims = node["fn"].event_dim
    value, offset, scale = torch.broadcast_tensors(node["value"], fn.loc, fn.scale)
    precision = _per_variety(scale**-2, event_dims)
    weight = precision.sum(1)
    response = (precision * _per_variety(value - offset, event_dims)).sum(1) / weight
    # linearity: the change of the location is unit[k] * (Z @ probe)[v]
    change = base_distribution(at_probe.nodes[response_site]["fn"]).loc - fn.loc
    change = _per_variety(change.expand(value.shape), event_dims)
    row_sums = data.markers.standardized_columns(columns).to(dtype).sum(1, keepdim=True)
    unit = (change.mean(1) * row_sums).sum(0) / (row_sums**2).sum()
    expected = row_sums[:, None, :] * unit
    if (change - expected).abs().max() > LINEARITY_TOLERANCE * expected.abs().max():
        raise ValueError(
            f"the location of {response_site!r} is not linear in the standardised dosages "
            f"times {site!r}: coordinate-ascent marker updates do not apply to this model"
        )
    prior = base_distribution(at_zero.nodes[site]["fn"])
    if isinstance(prior, SpikeSlabNormal):
        scales = torch.stack([prior.spike_scale, prior.slab_scale]).reshape(2, -1, shape[-1])
        prior_variance = scales[:, :1] ** 2
    else:
        prior_variance = (prior.scale.detach() ** 2).expand(shape)[None]
    return WorkingRegression(response, weight, unit, prior_variance)


class CoordinateAscentGuide(AutoGuideList):
    """A mean-field guide whose marker block is a :class:`SpikeSlabCoordinateAscent` or, for a
    Gaussian prior given its scales, a :class:`GaussianCoordinateAscent`:
    :meth:`coordinate_update` runs its update (the SVI engine calls it every
    ``SVIConfig.cavi_every`` steps).
    """

    def __init__(
        self,
        model: Callable,
        data: NLMEData,
        response_site: str,
        model_kwargs: dict,
        create_plates: Callable,
        init_loc_fn: Callable,
        init_scale: float,
    ):
        super().__init__(model, create_plates=create_plates)
        trace = poutine.trace(model).get_trace(data, subsample_size=None, **model_kwargs)
        site = marker_effect_site(trace)
        spike_slab = isinstance(base_distribution(trace.nodes[site]["fn"]), SpikeSlabNormal)
        part = SpikeSlabCoordinateAscent if spike_slab else GaussianCoordinateAscent
        options = {}
        if part is GaussianCoordinateAscent:
            scale_site = global_scale_site(model, data, trace, site, model_kwargs)
            if scale_site is not None:
                start = init_loc_fn(trace.nodes[scale_site])
                options = {"scale_site": scale_site, "scale_init": start}
            local_site = local_scale_site(model, data, trace, site, model_kwargs)
            if local_site is not None:
                options["local_site"] = local_site
                options["local_init"] = init_loc_fn(trace.nodes[local_site])
            options["scale_init_sd"] = init_scale
        self.markers = part(
            model,
            trace,
            site,
            response_site,
            lambda *args, **kwargs: self[0].median(*args, **kwargs),
            marker_plate=lambda: self.plates[MARKER_PLATE],
            **options,
        )
        zeros = torch.zeros_like(trace.nodes[site]["value"])
        # the other sites start at their conditional prior medians given no marker effect
        # (as in a mean-field guide started at the prior medians), not given a prior draw
        conditioned = poutine.condition(model, data={site: zeros})
        rest = AutoNormal(
            poutine.block(conditioned, hide=[site, *self.markers.hidden_sites]),
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
        )
        self.append(rest)
        self.append(self.markers)

    def closed_form_means(self, data: NLMEData) -> dict[str, torch.Tensor]:
        """``{site: E_q[b]}`` where the marker factor's mean is exact and its draws are too
        spread for a mean over draws (the joint Gaussian factor); empty otherwise."""
        if isinstance(self.markers, GaussianCoordinateAscent):
            return {self.markers.site: self.markers.posterior(data.markers).mean}
        return {}

    def coordinate_update(self, data: NLMEData, subsample_size=None, **model_kwargs) -> None:
        """Update the marker factor on the full data (``subsample_size`` is ignored)."""
        self.markers.update(data, **model_kwargs)
