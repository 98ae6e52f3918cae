"""The kinship (GBLUP) form of Gaussian marker effects: genetic values with the genomic
relationship matrix as covariance, and the back-solve from genetic values to marker effects.

With ``Z`` the standardised dosages ``[V, M]`` (:meth:`GenotypeMatrix.standardized`) and marker
effects ``beta[:, k] ~ Normal(0, genetic_sd[k] ** 2 / M * I_M)`` (the effects form,
:func:`pyro_nlme.model.priors.marker_effects`), the genetic values ``g[:, k] = Z @ beta[:, k]``
are Gaussian with mean 0 and covariance ``genetic_sd[k] ** 2 * Z Z^T / M = genetic_sd[k] ** 2 *
K``, ``K`` VanRaden's genomic relationship matrix (``[V, V]``). Sampling ``g`` from that Gaussian
is the same prior on everything the data see, with ``V`` latents per curve parameter instead of
``M`` (docs/nuts.md gives the argument). Models sample it non-centred,
``g[:, k] = genetic_sd[k] * F @ raw[:, k]`` with ``raw ~ Normal(0, 1)`` and ``F F^T = K``, or
centred in the eigen-basis of ``K`` (:func:`kinship_genetic_values`).

``K`` is singular: the columns of ``Z`` are centred over the varieties, so ``K 1 = 0`` (and its
rank is at most ``min(V - 1, M)``). ``F`` is therefore the symmetric eigen-factor
``U diag(sqrt(lambda))`` of ``K``, which is exact for a singular ``K``; a Cholesky factor needs
the ``jitter`` of :func:`genomic_relationship`.
"""

from __future__ import annotations

import weakref

import pyro
import pyro.distributions as dist
import torch

from pyro_nlme.data import GenotypeMatrix

KINSHIP_COMPONENT_DIM = "kinship_component"
"""Name of the first dim of the latent ``{name}_raw`` or ``{name}_component``: one
eigen-direction of ``K`` per row (not one variety)."""
DEFAULT_BLOCK_ROWS = 256
"""Rows of the genotype matrix standardised at once (256 x 60,000 float64 is 123 MB)."""
RANK_TOLERANCE = 1e-6
"""In the back-solve, eigenvalues of ``K`` below this fraction of the largest are treated as 0:
the float32 standardisation of the dosages leaves ``K 1`` at about 1e-7 instead of 0, and
inverting that direction would only amplify rounding."""

_FACTOR_CACHE: dict[int, dict] = {}
"""id of a dosage tensor -> {(dtype, device): factor}; an entry is dropped when its tensor is
freed (tensors compare elementwise, so a WeakKeyDictionary cannot hold them)."""


def _row_blocks(n_rows: int, block_rows: int, device: torch.device) -> list[torch.Tensor]:
    return [
        torch.arange(start, min(start + block_rows, n_rows), device=device)
        for start in range(0, n_rows, block_rows)
    ]


def genomic_relationship(
    markers: GenotypeMatrix,
    jitter: float = 0.0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """VanRaden's genomic relationship matrix ``K = Z Z^T / M`` (plus ``jitter * I``).

    ``Z`` are the standardised dosages (column means and SDs over all rows of ``markers``,
    missing genotypes and monomorphic markers 0), ``M`` the number of markers, monomorphic ones
    included, so that ``K`` is exactly the covariance of ``Z @ beta`` per unit of
    ``genetic_sd ** 2`` under :func:`pyro_nlme.model.priors.marker_effects`. Its mean diagonal is
    about ``1 - n_monomorphic / M``. Computed from blocks of ``block_rows`` rows of the int8
    dosages: no float copy of the whole ``[V, M]`` matrix is made.

    :param markers: genotypes of ``V`` varieties at ``M`` markers.
    :param jitter: added to the diagonal. ``K`` is singular (``K 1 = 0``), so a Cholesky
        factorisation needs ``jitter > 0`` (``1e-6`` is enough in float64 and changes the
        covariance by 1e-6 of its scale); :func:`relationship_factor` does not need it.
    :param block_rows: rows standardised at once (memory ``2 * block_rows * M`` floats).
    :param dtype: float type of the computation and of the result.
    :returns: ``[V, V]`` symmetric positive semi-definite matrix, dimensionless.
    """
    n_varieties, n_markers = markers.n_varieties, markers.n_markers
    device = markers.dosages.device
    relationship = torch.zeros(n_varieties, n_varieties, dtype=dtype, device=device)
    blocks = _row_blocks(n_varieties, block_rows, device)
    for i, rows_i in enumerate(blocks):
        z_i = markers.standardized(rows_i).to(dtype)
        for rows_j in blocks[: i + 1]:
            z_j = z_i if rows_j is rows_i else markers.standardized(rows_j).to(dtype)
            block = z_i @ z_j.T / n_markers
            if rows_j is rows_i:  # a product with its own transpose is not symmetric in BLAS
                block = (block + block.T) / 2
            relationship[rows_i[:, None], rows_j] = block
            relationship[rows_j[:, None], rows_i] = block.T
    if jitter:
        relationship.diagonal().add_(jitter)
    return relationship


def relationship_factor(relationship: torch.Tensor) -> torch.Tensor:
    """A square root ``F`` of a relationship matrix, ``F F^T = K``, exact for singular ``K``.

    ``F = U diag(sqrt(lambda))`` from the eigen-decomposition ``K = U diag(lambda) U^T``, with
    negative rounding of zero eigenvalues set to 0. Column ``j`` of ``F`` is
    the ``j``-th eigen-direction of ``K`` (ascending eigenvalues), so a non-centred latent
    ``raw[j]`` is one principal component of the genetic values: with similar information on
    every variety these are nearly independent a posteriori, which suits a diagonal mass
    matrix. Each direction's sign is fixed (its largest entry in absolute value is positive):
    ``eigh`` leaves it to the LAPACK or CUDA solver, and a latent component must mean the same
    on every device.

    :param relationship: ``[V, V]`` symmetric positive semi-definite.
    :returns: ``[V, V]``, same dtype and device.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(relationship)
    largest = eigenvectors.abs().argmax(dim=0, keepdim=True)
    eigenvectors = eigenvectors * eigenvectors.gather(0, largest).sign()
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def cached_relationship_factor(
    markers: GenotypeMatrix, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """:func:`relationship_factor` of :func:`genomic_relationship`, computed once per genotype
    matrix (cached on the identity of ``markers.dosages``, released with it) and returned in
    ``dtype`` on ``device``: a model that calls it at every step pays for ``K`` once.

    :returns: ``[V, V]``.
    """
    device = torch.device(device) if device is not None else markers.dosages.device
    key = id(markers.dosages)
    if key not in _FACTOR_CACHE:
        exact = relationship_factor(genomic_relationship(markers))
        _FACTOR_CACHE[key] = {(exact.dtype, exact.device): exact}
        weakref.finalize(markers.dosages, _FACTOR_CACHE.pop, key, None)
    per_matrix = _FACTOR_CACHE[key]
    exact = next(iter(per_matrix.values()))
    if (dtype, device) not in per_matrix:
        per_matrix[(dtype, device)] = exact.to(dtype=dtype, device=device)
    return per_matrix[(dtype, device)]


KINSHIP_PARAMETRIZATIONS = ("noncentred", "centred")
"""Values of ``parametrization`` in :func:`kinship_genetic_values`."""


def kinship_genetic_values(
    markers: GenotypeMatrix,
    genetic_sd: torch.Tensor,
    name: str = "genetic_value",
    parametrization: str = "noncentred",
) -> torch.Tensor:
    """Genetic values ``g[:, k] ~ MultivariateNormal(0, genetic_sd[k] ** 2 * K)`` as a
    population-level latent in the eigen-basis of ``K`` and a deterministic site ``name``
    ``[V, K]``. Call it outside the variety plate: the genetic values of different varieties
    are correlated.

    - ``"noncentred"``: ``{name}_raw ~ Normal(0, 1)`` ``[V, K]`` and ``g = F @ raw * genetic_sd``
      (``F`` from :func:`relationship_factor`). Suits weakly informative data (few observations
      per variety), and NUTS, which sees no funnel between ``raw`` and ``genetic_sd``.
    - ``"centred"``: ``{name}_component[j, k] ~ Normal(0, genetic_sd[k] * sqrt(lambda_j))``
      ``[R, K]`` over the ``R`` eigen-directions with ``lambda_j`` above
      :data:`RANK_TOLERANCE` of the largest (the null direction ``K 1 = 0`` carries no genetic
      variance) and ``g = U @ component``. Suits data that determine each variety's genetic value
      well, and mean-field variational guides: with the non-centred form, a diagonal guide can
      set ``raw`` to its prior and ``genetic_sd`` to 0 at no cost in KL, and the genetic variance
      collapses into the variety x scenario effects (docs/svi.md).

    Both are the same prior of ``g`` (up to the rounding of the null direction).

    Event dims of the latent: ``(kinship_component, curve_parameter)``, one row per
    eigen-direction (ascending eigenvalues), not per variety.

    :param markers: genotypes of all ``V`` varieties of the data (phenotyped or not).
    :param genetic_sd: ``[K]`` genetic SD per curve parameter, in the units of the curve
        parameters.
    :param name: name of the deterministic site; the latent is ``{name}_raw`` or
        ``{name}_component``.
    :param parametrization: one of :data:`KINSHIP_PARAMETRIZATIONS`.
    :returns: ``[V, K]`` genetic values.
    """
    if parametrization not in KINSHIP_PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization must be one of {KINSHIP_PARAMETRIZATIONS}, got {parametrization!r}"
        )
    factor = cached_relationship_factor(markers, genetic_sd.dtype, genetic_sd.device)
    n_varieties, n_parameters = factor.shape[0], genetic_sd.shape[-1]
    if parametrization == "noncentred":
        zero = genetic_sd.new_zeros(n_varieties, n_parameters)
        raw = pyro.sample(f"{name}_raw", dist.Normal(zero, 1.0).to_event(2))
        return pyro.deterministic(name, (factor @ raw) * genetic_sd, event_dim=2)
    root_eigenvalues = factor.norm(dim=0)  # column j of F is U_j sqrt(lambda_j)
    kept = root_eigenvalues**2 > RANK_TOLERANCE * root_eigenvalues.max() ** 2
    root_eigenvalues, eigenvectors = (
        root_eigenvalues[kept],
        factor[:, kept] / root_eigenvalues[kept],
    )
    component = pyro.sample(
        f"{name}_component",
        dist.Normal(genetic_sd.new_zeros(()), root_eigenvalues[:, None] * genetic_sd).to_event(2),
    )
    return pyro.deterministic(name, eigenvectors @ component, event_dim=2)


def blup_marker_effects(
    markers: GenotypeMatrix,
    genetic_value: torch.Tensor,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> torch.Tensor:
    """Marker effects from genetic values (the BLUP back-solve):
    ``E[beta | g] = Z^T K^+ g / M``.

    Under the effects form ``beta ~ Normal(0, genetic_sd ** 2 / M)``, ``g = Z beta``:
    ``Cov(beta, g) = genetic_sd ** 2 Z^T / M`` and ``Var(g) = genetic_sd ** 2 K``, so the
    conditional mean is ``Z^T K^+ g / M`` whatever ``genetic_sd`` (``K^+`` the pseudo-inverse,
    eigenvalues below :data:`RANK_TOLERANCE` of the largest dropped: ``g`` lies in the range of
    ``K``). Only a ``V x V`` system is solved; ``Z^T`` is applied in
    blocks of rows. The map is linear, and ``beta`` is independent of the data given ``g``, so
    back-solving the posterior mean of ``g`` gives the posterior mean of ``beta`` exactly.

    :param markers: the genotypes the genetic values were defined with (same ``V`` rows).
    :param genetic_value: ``[V]`` or ``[V, K]`` genetic values, curve-parameter units.
    :returns: ``[M]`` or ``[M, K]`` marker effects, curve-parameter units per standardised
        dosage, float64.
    """
    relationship = genomic_relationship(markers, block_rows=block_rows)
    eigenvalues, eigenvectors = torch.linalg.eigh(relationship)
    cutoff = RANK_TOLERANCE * eigenvalues.abs().max()
    inverse = torch.where(eigenvalues > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    values = genetic_value.to(relationship)
    vector = values.ndim == 1
    values = values[:, None] if vector else values
    weights = eigenvectors @ (inverse[:, None] * (eigenvectors.T @ values))
    effects = torch.zeros(markers.n_markers, values.shape[1], dtype=relationship.dtype)
    effects = effects.to(relationship.device)
    for rows in _row_blocks(markers.n_varieties, block_rows, relationship.device):
        effects += markers.standardized(rows).to(relationship.dtype).T @ weights[rows]
    effects /= markers.n_markers
    return effects[:, 0] if vector else effects


def attach_marker_effects(idata, markers: GenotypeMatrix, name: str = "genetic_value") -> None:
    """Add the back-solved ``marker_effect`` draws ``[chain, draw, marker, curve_parameter]``
    to a kinship-form fit's posterior (one linear solve for all draws), so that varieties never
    phenotyped can be predicted from their markers (``pyro-nlme predict``). Each draw is
    ``E[beta | g]`` for that draw's genetic values: the conditional variance of ``beta`` given
    ``g`` is not added, so predictive intervals of new varieties are too narrow by the part of
    their genetic variance not explained by relationship with the training varieties.

    :param idata: InferenceData whose posterior has ``name`` with dims
        ``(chain, draw, variety, curve_parameter)`` over the varieties of ``markers``.
    """
    genetic = idata.posterior[name]
    n_chains, n_draws, n_varieties, n_parameters = genetic.shape
    columns = torch.as_tensor(genetic.values).permute(2, 0, 1, 3).reshape(n_varieties, -1)
    effects = blup_marker_effects(markers, columns)
    effects = effects.reshape(markers.n_markers, n_chains, n_draws, n_parameters)
    idata.posterior["marker_effect"] = (
        ("chain", "draw", "marker", genetic.dims[-1]),
        effects.permute(1, 2, 0, 3).to(torch.float32).cpu().numpy(),
    )
    idata.posterior = idata.posterior.assign_coords(marker=list(markers.marker_ids))
