"""Initial values of variational parameters."""

from __future__ import annotations

import torch
from pyro.infer.autoguide import init_to_median

from pyro_nlme.infer.util import base_distribution

MEDIAN_SAMPLES = 201
"""Prior draws behind the initial value of a site whose median has no closed form."""


def init_to_prior_median(site: dict) -> torch.Tensor:
    """Initial value of a latent site: its prior median, exactly (``icdf(0.5)``) where the
    distribution has an inverse CDF, else from :data:`MEDIAN_SAMPLES` prior draws. Sampled
    medians of vague priors land hundreds of units off (15 draws, Pyro's default, even more),
    so closed forms come first. Local latents start at their conditional prior median."""
    fn = site["fn"]
    try:
        base = base_distribution(fn)
        half = torch.full(base.batch_shape, 0.5, dtype=base.mean.dtype, device=base.mean.device)
        median = base.icdf(half)
        return median.expand(fn.shape())
    except NotImplementedError:
        return init_to_median(site, num_samples=MEDIAN_SAMPLES)
