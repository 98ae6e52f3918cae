"""Orange and ``g2was`` without markers written in NumPyro, for NumPyro's NUTS on the same
model as ours: same priors (located and scaled from the data by
:class:`pyro_nlme.model.GrowthScale`, as the Pyro models do), same likelihood, same site names;
the draws come back with the dims of our exporter, so every score applies unchanged.

Written by hand: a change of prior in ``models/orange.py`` or ``models/g2was.py`` must be made
here too (the agreement of this peer with our NUTS on the same data is the check).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, init_to_median

from benchmarks.compare.datasets import Prepared
from pyro_nlme.model import GrowthScale

LOGNORMAL_NOISE_SCALE = 0.5  # pyro_nlme.model.observations.LogNormal.noise_scale


def _scale(prepared: Prepared) -> dict[str, float]:
    scale = GrowthScale.of(prepared.data)
    return {
        "value_max": float(scale.value_max),
        "time_start": float(scale.time_start),
        "time_span": float(scale.time_span),
        "centre": np.asarray(scale.logistic_centre, dtype=np.float32),
        "spread": np.asarray(scale.logistic_spread, dtype=np.float32),
    }


def orange(times, values, mask, value_max, time_start, time_span, **_):
    """``models/orange.py``: ``times``, ``values``, ``mask`` are ``[V, T]``."""
    asymptote = numpyro.sample("asymptote", dist.Normal(value_max, 10 * value_max))
    inflection = numpyro.sample(
        "inflection", dist.Normal(time_start + time_span / 2, 10 * time_span)
    )
    scale = numpyro.sample("scale", dist.LogNormal(jnp.log(time_span / 8), 3.0))
    asymptote_sd = numpyro.sample("asymptote_sd", dist.HalfCauchy(value_max))
    noise_sd = numpyro.sample("noise_sd", dist.HalfCauchy(value_max / 10))
    with numpyro.plate("variety", times.shape[0], dim=-2):
        effect = numpyro.sample("asymptote_effect", dist.Normal(0.0, asymptote_sd))
    curve = (asymptote + effect) * jax.nn.sigmoid((times - inflection) / scale)
    with numpyro.handlers.mask(mask=mask):
        numpyro.sample("obs", dist.Normal(curve, noise_sd), obs=values)


def g2was_without_markers(times, values, mask, centre, spread, **_):
    """``models/g2was.py`` without markers, lognormal observations, several scenarios and
    plants: ``times``, ``values``, ``mask`` are ``[V, S, P, T]``."""
    n_varieties, n_scenarios, n_plants, _ = times.shape
    scenario_mean = numpyro.sample(
        "scenario_mean",
        dist.Normal(jnp.broadcast_to(centre, (n_scenarios, 3)), spread).to_event(2),
    )
    genetic_sd = numpyro.sample("genetic_sd", dist.HalfNormal(spread / 2).to_event(1))
    variety_scenario_sd = numpyro.sample(
        "variety_scenario_sd", dist.HalfNormal(spread / 2).to_event(1)
    )
    plant_sd = numpyro.sample("plant_sd", dist.HalfNormal(spread / 4).to_event(1))
    noise_sd = numpyro.sample("noise_sd", dist.HalfNormal(LOGNORMAL_NOISE_SCALE))
    with numpyro.plate("variety", n_varieties, dim=-3):
        genetic = numpyro.sample("genetic_value", dist.Normal(0.0, genetic_sd).to_event(1))
        with numpyro.plate("scenario", n_scenarios, dim=-2):
            interaction = numpyro.sample(
                "variety_scenario_effect", dist.Normal(0.0, variety_scenario_sd).to_event(1)
            )
            with numpyro.plate("plant", n_plants, dim=-1):
                plant = numpyro.sample("plant_effect", dist.Normal(0.0, plant_sd).to_event(1))
    phi = scenario_mean[None, :, None, :] + genetic + interaction + plant  # [V, S, P, 3]
    log_curve = phi[..., 0:1] + jax.nn.log_sigmoid(jnp.exp(phi[..., 1:2]) * (times - phi[..., 2:3]))
    with numpyro.handlers.mask(mask=mask):
        numpyro.sample("obs", dist.LogNormal(log_curve, noise_sd), obs=values)


def _inputs(prepared: Prepared, dataset: str):
    data = prepared.data
    mask = data.mask.numpy()
    values = np.where(mask, data.values.numpy(), 1.0)  # masked entries: any positive value
    times = data.times.numpy()
    if dataset == "orange":
        n = times.shape[0]
        return orange, times.reshape(n, -1), values.reshape(n, -1), mask.reshape(n, -1)
    if data.markers is not None or data.n_scenarios < 2 or data.n_plants < 2:
        raise ValueError(
            "the NumPyro g2was is written for the design without markers, with several "
            "scenarios and plants"
        )
    return g2was_without_markers, times, values, mask


def _squeeze(name: str, draws: np.ndarray) -> np.ndarray:
    """Draws ``[chain, draw, ...]`` with the size-1 plate dims dropped, as our exporter."""
    if name == "genetic_value":
        return draws[:, :, :, 0, 0, :]
    if name == "variety_scenario_effect":
        return draws[:, :, :, :, 0, :]
    if name == "asymptote_effect":
        return draws[:, :, :, 0]
    return draws


def sample(
    prepared: Prepared,
    dataset: str,
    seed: int,
    chains: int = 2,
    warmup: int = 500,
    samples: int = 500,
    max_tree_depth: int = 10,
) -> tuple[dict[str, np.ndarray], dict]:
    """NUTS draws ``{name: [chain, draw, ...]}`` and diagnostics (``max_r_hat``,
    ``divergences``, ``min_ess_bulk``)."""
    model, times, values, mask = _inputs(prepared, dataset)
    kernel = NUTS(
        model, init_strategy=init_to_median(num_samples=15), max_tree_depth=max_tree_depth
    )
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    started = time.perf_counter()
    mcmc.run(
        jax.random.PRNGKey(seed),
        jnp.asarray(times),
        jnp.asarray(values),
        jnp.asarray(mask),
        extra_fields=("diverging",),
        **_scale(prepared),
    )
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    individual = ("genetic_value", "variety_scenario_effect", "plant_effect", "asymptote_effect")
    summary = numpyro.diagnostics.summary({k: v for k, v in draws.items() if k not in individual})
    metrics = {
        "sampler_wall_s": time.perf_counter() - started,
        "max_r_hat": float(max(np.nanmax(s["r_hat"]) for s in summary.values())),
        "min_ess_bulk": float(min(np.nanmin(s["n_eff"]) for s in summary.values())),
        "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
    }
    return {k: _squeeze(k, v) for k, v in draws.items()}, metrics
