"""Priors of marker effects ``beta [M, K]`` (``M`` markers, ``K`` curve parameters) for models
whose genetic values are ``Z @ beta`` with ``Z`` the standardised dosages.

- ``ridge``: ``beta[m, k] ~ Normal(0, genetic_sd[k] / sqrt(M))``, the Gaussian prior whose
  genetic values have covariance ``genetic_sd ** 2 * K`` (GBLUP, :mod:`pyro_nlme.model.kinship`).
- ``horseshoe``: the regularised horseshoe of Piironen & Vehtari (2017, Electron. J. Stat. 11,
  5018), ``beta[m, k] ~ Normal(0, tau[k] * lambda_tilde[m, k])`` with
  ``lambda_tilde ** 2 = c ** 2 lambda ** 2 / (c ** 2 + tau ** 2 lambda ** 2)``, local scales
  ``lambda ~ HalfCauchy(1)``, global scale ``tau[k] ~ HalfCauchy(tau0[k])`` with
  ``tau0 = p0 / (M - p0) * scale / sqrt(n)`` (``p0`` the expected number of non-zero effects,
  ``n`` the number of phenotyped varieties, ``scale`` the SD of the response) and slab
  ``c[k] ** 2 ~ InverseGamma(slab_df / 2, slab_df * (slab_scale * scale[k]) ** 2 / 2)``.
- ``spike_slab``: the continuous spike-and-slab (George & McCulloch 1993) with the indicator
  summed out, ``beta[m, k] ~ pi[k] Normal(0, slab_sd[k]) + (1 - pi[k]) Normal(0, spike_sd[k])``,
  ``pi[k] ~ Beta(1, (M - p0) / p0)`` (prior mean ``p0 / M``), ``slab_sd = genetic_sd *
  slab_scale / sqrt(p0)`` (a QTL carries about ``1 / p0`` of the genetic variance) and
  ``spike_sd = genetic_sd * spike_scale / sqrt(M)`` (``spike_scale = 0.1``: a tenth of the
  ridge scale, a small polygenic background rather than an exact zero; with a spike at the
  ridge scale, mean-field SVI collapsed the genetic SD, docs/marker_priors.md). The
  deterministic site ``{name}_inclusion_probability`` is the conditional probability
  ``P(slab | beta, pi, genetic_sd)`` of each draw; its posterior mean is the posterior inclusion
  probability (PIP, Rao-Blackwellised).
- ``shared=True`` (both sparse priors): one local scale ``lambda[m]`` or one indicator per marker
  for all ``K`` curve parameters (a locus acting on several parameters); global scales, slabs and
  spike and slab SDs stay per parameter, the inclusion probability ``pi`` becomes one scalar.

Every per-marker site is in the ``marker`` plate (dim -1, outside the variety plate:
population-level), with the curve parameters as its event dim. The effects are sampled centred;
the engines sample location-scale sites in plates non-centred (SVI:
:func:`pyro_nlme.infer.svi.noncentred`; NUTS: ``reparam=True``), which for the
horseshoe is the non-centred form ``beta = tau * lambda_tilde * z``, ``z ~ Normal(0, 1)``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import broadcast_shape

MARKER_PLATE = "marker"
MARKER_PRIORS = ("ridge", "horseshoe", "spike_slab")
DEFAULT_EXPECTED_NONZERO = 10.0
"""Prior guess ``p0`` of the number of markers with a large effect, per curve parameter."""


def marker_plate(n_markers: int) -> pyro.plate:
    """The plate of markers (dim -1). Pass one plate object to every function that samples
    per-marker sites in a model: Pyro names a plate's site after the plate, once a trace."""
    return pyro.plate(MARKER_PLATE, n_markers, dim=-1)


class SpikeSlabNormal(TorchDistribution):
    """Two-component mixture of normals, the indicator summed out:
    ``inclusion * Normal(slab_loc, slab_scale) + (1 - inclusion) * Normal(spike_loc,
    spike_scale)``. With zero locations (the default) it is the spike-and-slab prior; with
    locations it is also the mean-field posterior of a spike-and-slab effect
    (:mod:`pyro_nlme.infer.guides.marker_cavi`).

    With ``shared=False`` the mixture is elementwise (batch shape: the broadcast of the three
    arguments, no event dims). With ``shared=True`` one indicator covers the last dim of
    ``spike_scale`` and ``slab_scale`` (the event dim, e.g. ``K`` curve parameters):
    ``inclusion * prod_k Normal(x_k; 0, slab_k) + (1 - inclusion) * prod_k Normal(x_k; 0,
    spike_k)``, with ``inclusion`` of the batch shape.

    :param spike_scale: SD of the narrow component (> 0).
    :param slab_scale: SD of the wide component (> 0).
    :param inclusion: probability of the wide component, in ``(0, 1)``.
    :param spike_loc: mean of the narrow component (default 0), shaped like ``spike_scale``.
    :param slab_loc: mean of the wide component (default 0), shaped like ``slab_scale``.
    """

    arg_constraints = {
        "spike_scale": constraints.positive,
        "slab_scale": constraints.positive,
        "inclusion": constraints.unit_interval,
        "spike_loc": constraints.real,
        "slab_loc": constraints.real,
    }

    def __init__(
        self,
        spike_scale: torch.Tensor,
        slab_scale: torch.Tensor,
        inclusion: torch.Tensor,
        shared: bool = False,
        validate_args: bool | None = None,
        spike_loc: torch.Tensor | None = None,
        slab_loc: torch.Tensor | None = None,
    ):
        self.shared = shared
        spike_loc = torch.zeros_like(spike_scale) if spike_loc is None else spike_loc
        slab_loc = torch.zeros_like(slab_scale) if slab_loc is None else slab_loc
        parts = (spike_scale, slab_scale, spike_loc, slab_loc)
        if shared:
            event = broadcast_shape(*(part.shape[-1:] for part in parts))
            batch = broadcast_shape(*(part.shape[:-1] for part in parts), inclusion.shape)
        else:
            event = torch.Size()
            batch = broadcast_shape(*(part.shape for part in parts), inclusion.shape)
        self.spike_scale, self.slab_scale, self.spike_loc, self.slab_loc = (
            part.expand(batch + event) for part in parts
        )
        self.inclusion = inclusion.expand(batch)
        super().__init__(batch, event, validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, 1) if self.shared else constraints.real

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        event = self.event_shape
        return SpikeSlabNormal(
            self.spike_scale.expand(batch_shape + event),
            self.slab_scale.expand(batch_shape + event),
            self.inclusion.expand(batch_shape),
            shared=self.shared,
            validate_args=False,
            spike_loc=self.spike_loc.expand(batch_shape + event),
            slab_loc=self.slab_loc.expand(batch_shape + event),
        )

    @property
    def mean(self) -> torch.Tensor:
        inclusion = self.inclusion[..., None] if self.shared else self.inclusion
        return inclusion * self.slab_loc + (1 - inclusion) * self.spike_loc

    @property
    def variance(self) -> torch.Tensor:
        inclusion = self.inclusion[..., None] if self.shared else self.inclusion
        second_moment = inclusion * (self.slab_scale**2 + self.slab_loc**2) + (1 - inclusion) * (
            self.spike_scale**2 + self.spike_loc**2
        )
        return second_moment - self.mean**2

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        """Marginal CDF of each coordinate (with ``shared=True`` too: each coordinate is the
        same two-component mixture), shape of ``value`` broadcast with the components."""
        inclusion = self.inclusion[..., None] if self.shared else self.inclusion
        slab = dist.Normal(self.slab_loc, self.slab_scale).cdf(value)
        spike = dist.Normal(self.spike_loc, self.spike_scale).cdf(value)
        return inclusion * slab + (1 - inclusion) * spike

    def icdf(self, value: torch.Tensor, iterations: int = 100) -> torch.Tensor:
        """Marginal quantiles of each coordinate, by bisection of :meth:`cdf` (the mixture's
        quantile has no closed form); with ``shared=True`` ``value`` of the batch shape gives
        ``[*batch, K]``."""
        if self.shared and value.shape == self.batch_shape:
            value = value[..., None]
        lower = torch.minimum(self.spike_loc, self.slab_loc) - 40 * self.slab_scale.maximum(
            self.spike_scale
        )
        upper = torch.maximum(self.spike_loc, self.slab_loc) + 40 * self.slab_scale.maximum(
            self.spike_scale
        )
        lower, upper, value = torch.broadcast_tensors(lower, upper, value)
        lower, upper = lower.clone(), upper.clone()
        for _ in range(iterations):
            middle = (lower + upper) / 2
            below = self.cdf(middle) < value
            lower = torch.where(below, middle, lower)
            upper = torch.where(below, upper, middle)
        return (lower + upper) / 2

    def _component_log_probs(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log pi + log slab density, log(1 - pi) + log spike density)``, batch shape."""
        slab = dist.Normal(self.slab_loc, self.slab_scale).log_prob(value)
        spike = dist.Normal(self.spike_loc, self.spike_scale).log_prob(value)
        if self.shared:
            slab, spike = slab.sum(-1), spike.sum(-1)
        return slab + self.inclusion.log(), spike + (-self.inclusion).log1p()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        slab, spike = self._component_log_probs(value)
        return torch.logaddexp(slab, spike)

    def inclusion_probability(self, value: torch.Tensor) -> torch.Tensor:
        """``P(slab | value)``, batch shape: the posterior probability of the wide component
        for one draw of the value and of the mixture's parameters."""
        slab, spike = self._component_log_probs(value)
        return torch.sigmoid(slab - spike)

    def sample(self, sample_shape=()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            included = torch.bernoulli(self.inclusion.expand(sample_shape + self.batch_shape))
            if self.shared:
                included = included.unsqueeze(-1)
            slab = included.bool()
            scale = torch.where(slab, self.slab_scale, self.spike_scale).expand(shape)
            loc = torch.where(slab, self.slab_loc, self.spike_loc).expand(shape)
            return loc + scale * torch.randn(shape, dtype=scale.dtype, device=scale.device)


def ridge_effects(
    n_markers: int,
    genetic_sd: torch.Tensor,
    name: str = "marker_effect",
    plate: pyro.plate | None = None,
) -> torch.Tensor:
    """Gaussian marker effects ``[M, K]``, ``beta[m, k] ~ Normal(0, genetic_sd[k] / sqrt(M))``:
    with standardised dosages the genetic values ``Z @ beta`` have variance ``genetic_sd ** 2``
    (VanRaden scaling).

    :param genetic_sd: ``[K]`` genetic SD per curve parameter.
    :param plate: the model's marker plate (default: a new :func:`marker_plate`).
    """
    scale = genetic_sd / math.sqrt(n_markers)
    with plate or marker_plate(n_markers):
        return pyro.sample(name, dist.Normal(torch.zeros_like(scale), scale).to_event(1))


def horseshoe_global_scale(
    n_markers: int, n_observations: int, scale: torch.Tensor, expected_nonzero: float
) -> torch.Tensor:
    """Piironen & Vehtari's ``tau0 = p0 / (M - p0) * scale / sqrt(n)``, ``[K]``."""
    if not 0 < expected_nonzero < n_markers:
        raise ValueError(f"expected_nonzero must be in (0, {n_markers}), got {expected_nonzero}")
    return expected_nonzero / (n_markers - expected_nonzero) * scale / math.sqrt(n_observations)


def horseshoe_effects(
    n_markers: int,
    n_observations: int,
    scale: torch.Tensor,
    expected_nonzero: float = DEFAULT_EXPECTED_NONZERO,
    slab_scale: float = 1.0,
    slab_df: float = 4.0,
    shared: bool = False,
    name: str = "marker_effect",
    plate: pyro.plate | None = None,
) -> torch.Tensor:
    """Marker effects ``[M, K]`` under the regularised horseshoe (module docstring).

    Sites: ``{name}_global_scale`` ``[K]`` (``tau``), ``{name}_slab_variance`` ``[K]``
    (``c ** 2``), ``{name}_local_scale`` ``[M, K]`` (``[M]`` when shared; ``lambda``) and
    ``{name}`` ``[M, K]``.

    :param n_observations: ``n`` in ``tau0`` (phenotyped varieties).
    :param scale: ``[K]`` SD of the response the markers explain (trait units per curve
        parameter); sets ``tau0`` and the slab.
    :param expected_nonzero: ``p0``, prior guess of the number of non-zero effects per parameter.
    :param slab_scale: slab SD in units of ``scale``: the largest plausible effect.
    :param slab_df: degrees of freedom of the slab (Student-t slab of the limit ``c``).
    :param shared: one local scale per marker for all curve parameters.
    :param plate: the model's marker plate (default: a new :func:`marker_plate`).
    """
    tau0 = horseshoe_global_scale(n_markers, n_observations, scale, expected_nonzero)
    tau = pyro.sample(f"{name}_global_scale", dist.HalfCauchy(tau0).to_event(1))
    slab_variance = pyro.sample(
        f"{name}_slab_variance",
        dist.InverseGamma(
            torch.full_like(scale, slab_df / 2), slab_df * (slab_scale * scale) ** 2 / 2
        ).to_event(1),
    )
    with plate or marker_plate(n_markers):
        if shared:
            local = pyro.sample(f"{name}_local_scale", dist.HalfCauchy(torch.ones_like(tau[0])))
            local = local[:, None]
        else:
            local = pyro.sample(
                f"{name}_local_scale", dist.HalfCauchy(torch.ones_like(tau)).to_event(1)
            )
        sd = tau * regularised_local_scale(local, tau, slab_variance)
        return pyro.sample(name, dist.Normal(torch.zeros_like(sd), sd).to_event(1))


def regularised_local_scale(
    local: torch.Tensor, tau: torch.Tensor, slab_variance: torch.Tensor
) -> torch.Tensor:
    """``lambda_tilde = sqrt(c ** 2 lambda ** 2 / (c ** 2 + tau ** 2 lambda ** 2))``: close to
    ``lambda`` for small effects, to ``c / tau`` for large ones (so ``tau * lambda_tilde <= c``)."""
    local_variance = local**2
    return torch.sqrt(slab_variance * local_variance / (slab_variance + tau**2 * local_variance))


def spike_slab_scales(
    n_markers: int,
    genetic_sd: torch.Tensor,
    expected_nonzero: float,
    slab_scale: float,
    spike_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(spike_sd, slab_sd)``, ``[K]`` each (module docstring)."""
    if not 0 < expected_nonzero < n_markers:
        raise ValueError(f"expected_nonzero must be in (0, {n_markers}), got {expected_nonzero}")
    return (
        genetic_sd * spike_scale / math.sqrt(n_markers),
        genetic_sd * slab_scale / math.sqrt(expected_nonzero),
    )


def spike_slab_effects(
    n_markers: int,
    genetic_sd: torch.Tensor,
    expected_nonzero: float = DEFAULT_EXPECTED_NONZERO,
    slab_scale: float = 1.0,
    spike_scale: float = 0.1,
    shared: bool = False,
    name: str = "marker_effect",
    plate: pyro.plate | None = None,
) -> torch.Tensor:
    """Marker effects ``[M, K]`` under the continuous spike-and-slab, indicator summed out
    (module docstring).

    Sites: ``{name}_inclusion`` ``[K]`` (scalar when shared; ``pi``),
    ``{name}_standardised`` ``[M, K]`` (``beta / sqrt(spike_sd * slab_sd)``, the sampled
    site), and the
    deterministic ``{name}`` ``[M, K]`` and ``{name}_inclusion_probability`` ``[M, K]``
    (``P(slab | beta, pi, genetic_sd)`` of the draw; identical across curve parameters when
    shared).

    :param genetic_sd: ``[K]``, scale of the genetic values per curve parameter.
    :param expected_nonzero: ``p0``, prior mean of ``M * pi``.
    :param slab_scale: slab SD in units of ``genetic_sd / sqrt(p0)``.
    :param spike_scale: spike SD in units of ``genetic_sd / sqrt(M)`` (the ridge's scale).
    :param shared: one indicator per marker for all curve parameters.
    :param plate: the model's marker plate (default: a new :func:`marker_plate`).
    """
    spike_sd, slab_sd = spike_slab_scales(
        n_markers, genetic_sd, expected_nonzero, slab_scale, spike_scale
    )
    concentration = torch.ones_like(genetic_sd if not shared else genetic_sd[0])
    prior = dist.Beta(
        concentration, concentration * (n_markers - expected_nonzero) / expected_nonzero
    )
    inclusion = pyro.sample(f"{name}_inclusion", prior if shared else prior.to_event(1))
    # Sampled in units of sqrt(spike_sd * slab_sd) (not scaled by genetic_sd: non-centred).
    # A guide's unit-scale start (SD ~0.05) then sits at the spike's scale, not far inside the
    # slab (slab-SD units: every marker looked included) nor far below the QTL (spike-SD
    # units: a QTL needed thousands of Adam steps to reach its size).
    unit = torch.sqrt(spike_sd * slab_sd)
    with plate or marker_plate(n_markers):
        mixture = SpikeSlabNormal(spike_sd / unit, slab_sd / unit, inclusion, shared)
        standardised = pyro.sample(
            f"{name}_standardised", mixture if shared else mixture.to_event(1)
        )
        probability = mixture.inclusion_probability(standardised)
        if shared:
            probability = probability[:, None].expand(standardised.shape)
        pyro.deterministic(f"{name}_inclusion_probability", probability, event_dim=1)
        return pyro.deterministic(name, standardised * unit, event_dim=1)


def sample_marker_effects(
    prior: str,
    n_markers: int,
    n_observations: int,
    genetic_sd: torch.Tensor | None,
    scale: torch.Tensor,
    shared: bool = False,
    expected_nonzero: float = DEFAULT_EXPECTED_NONZERO,
    name: str = "marker_effect",
    plate: pyro.plate | None = None,
) -> torch.Tensor:
    """Marker effects ``[M, K]`` under the prior named ``prior`` (one of
    :data:`MARKER_PRIORS`), with default hyperparameters.

    :param genetic_sd: ``[K]`` latent genetic SD (ridge, spike-and-slab; unused by the
        horseshoe, whose scales are its own).
    :param scale: ``[K]`` fixed response scale of the horseshoe.
    :param shared: sparsity shared across curve parameters (sparse priors only).
    :param plate: the model's marker plate (default: a new :func:`marker_plate`).
    """
    if prior not in MARKER_PRIORS:
        raise ValueError(f"unknown marker prior {prior!r}; choose one of {MARKER_PRIORS}")
    if prior == "ridge":
        if shared:
            raise ValueError("the ridge prior has no sparsity to share")
        return ridge_effects(n_markers, genetic_sd, name, plate)
    if prior == "horseshoe":
        return horseshoe_effects(
            n_markers,
            n_observations,
            scale,
            expected_nonzero,
            shared=shared,
            name=name,
            plate=plate,
        )
    return spike_slab_effects(
        n_markers, genetic_sd, expected_nonzero, shared=shared, name=name, plate=plate
    )


def uses_genetic_sd(prior: str) -> bool:
    """Whether the prior is scaled by a latent ``genetic_sd`` (all but the horseshoe)."""
    return prior != "horseshoe"
