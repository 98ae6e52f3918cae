"""The NUTS engine: recorded sampler statistics, export schema (same names and dims as any
engine's export), recovery of centred sites, and statistical checks against exact references
(Orange: closed-form marginal likelihood; a small simulated design: the truth)."""

from __future__ import annotations

import dataclasses

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.ops.welford import WelfordCovariance

from pyro_nlme.data import load_orange
from pyro_nlme.export import to_inference_data
from pyro_nlme.infer.nuts import (
    SAMPLE_STATS,
    NUTSConfig,
    RecordingNUTS,
    ShrunkWelfordCovariance,
    fit_nuts,
    non_centred,
    recover_centred,
    reparametrised_sites,
    sampler_warnings,
)
from pyro_nlme.infer.util import ModelStructure, SiteInfo, model_structure
from pyro_nlme_models.orange import orange

QUICK = NUTSConfig(chains=2, warmup=15, samples=10, max_tree_depth=5, progress=False)


def funnel() -> None:
    """Neal's funnel, centred: NUTS diverges in its neck."""
    log_scale = pyro.sample("log_scale", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, (log_scale / 2).exp()).expand([4]).to_event(1))


def test_recorded_statistics_agree_with_pyro_own_counters():
    pyro.set_rng_seed(1)
    kernel = RecordingNUTS(funnel, max_tree_depth=6)
    pyro_counters = {}

    def hook(kernel, params, stage, i):
        # Pyro's own record, read before MCMC resets the kernel at the end of the run.
        pyro_counters.update(
            divergences=list(kernel._divergences), mean_accept_prob=kernel._mean_accept_prob
        )

    mcmc = MCMC(kernel, num_samples=150, warmup_steps=100, disable_progbar=True, hook_fn=hook)
    mcmc.run()
    sampling = kernel.transitions[100:]
    assert len(kernel.transitions) == 250
    diverging = [i for i, t in enumerate(sampling) if t["diverging"]]
    assert diverging == pyro_counters["divergences"] and diverging
    assert np.mean([t["accept_prob"] for t in sampling]) == pytest.approx(
        pyro_counters["mean_accept_prob"], rel=1e-6
    )
    for previous, t in zip(sampling, sampling[1:], strict=False):
        # A tree of depth d has 2**d - 1 leapfrog steps, plus part of a rejected doubling.
        assert 2 ** t["tree_depth"] - 1 <= t["n_steps"] <= 2 ** (t["tree_depth"] + 1) - 1
        # energy = kinetic (>= 0) + potential energy of the previous draw (= -lp).
        assert t["energy"] >= -previous["lp"] - 1e-4
        assert t["step_size"] == sampling[0]["step_size"]
    assert all(0.0 <= t["accept_prob"] <= 1.0 for t in sampling)


def _generalised_condition_number(covariance: torch.Tensor, metric: torch.Tensor) -> float:
    """Condition number of ``covariance`` in the units of ``metric`` (an inverse mass matrix):
    what the step size and the trajectory length of HMC depend on."""
    inverse_root = torch.linalg.inv(torch.linalg.cholesky(metric))
    values = torch.linalg.eigvalsh(inverse_root @ covariance @ inverse_root.T)
    return float(values.max() / values.min())


@pytest.mark.parametrize("n_draws", [25, 100, 5000])
def test_dense_mass_matrix_is_shrunk_towards_its_diagonal(n_draws):
    # 85 latents, as the centred kinship form of 6 varieties, with scales from 0.01 to 10 and
    # one strong correlation (a curve's asymptote and inflection).
    dim = 85
    scales = torch.logspace(-2, 1, dim, dtype=torch.float64)
    correlation = torch.eye(dim, dtype=torch.float64)
    correlation[0, 1] = correlation[1, 0] = 0.95
    truth = scales[:, None] * correlation * scales
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n_draws, dim, generator=generator, dtype=torch.float64)
    draws = noise @ torch.linalg.cholesky(truth).T
    ours, pyros = ShrunkWelfordCovariance(diagonal=False), WelfordCovariance(diagonal=False)
    for draw in draws:
        ours.update(draw)
        pyros.update(draw)
    estimate = ours.get_covariance()

    # Exact reference: inverse-Wishart posterior mean centred on the window's variances,
    # then Stan's regularisation.
    sample = torch.cov(draws.T)
    expected = ((n_draws - 1) * sample + dim * torch.diag(sample.diagonal())) / (n_draws - 1 + dim)
    expected = n_draws / (n_draws + 5) * expected + 5e-3 / (n_draws + 5) * torch.eye(dim)
    torch.testing.assert_close(estimate, expected.to(estimate))
    torch.testing.assert_close(estimate.diagonal(), pyros.get_covariance().diagonal())
    if n_draws < dim:
        # Pyro's estimate gives the directions the window did not span the floor 1e-3 * 5 /
        # (n + 5) as variance (measured: condition number 1.7e6; ours 229).
        assert _generalised_condition_number(truth, pyros.get_covariance()) > 1e5
        assert _generalised_condition_number(truth, estimate) < 1e3


def test_recording_nuts_adapts_a_dense_mass_matrix_with_shrinkage():
    kernel = RecordingNUTS(funnel, full_mass=True)
    MCMC(kernel, num_samples=1, warmup_steps=1, disable_progbar=True).run()
    schemes = list(kernel._adapter.mass_matrix_adapter._adapt_scheme.values())
    assert len(schemes) == 1 and isinstance(schemes[0], ShrunkWelfordCovariance)


@pytest.fixture(scope="module")
def quick_orange():
    return fit_nuts(orange, load_orange(), QUICK, model_name="orange")


def test_export_has_the_names_and_dims_of_any_engine(quick_orange, tmp_path):
    idata = quick_orange.inference_data
    data = load_orange()
    assert set(idata.groups()) >= {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
        "sample_stats",
    }
    # What an SVI export of the same model gives: draws of the latent sites from any engine
    # go through the same exporter. Here prior draws shaped [1, 4, *site shape].
    structure = model_structure(orange, data)
    prior = {
        name: torch.stack(
            [pyro.poutine.trace(orange).get_trace(data).nodes[name]["value"] for _ in range(4)]
        )[None]
        for name in structure.latent
    }
    other = to_inference_data(orange, data, prior, engine="svi", settings={}, seed=0)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        ours, theirs = idata[group], other[group]
        assert set(ours.data_vars) == set(theirs.data_vars)
        for name in ours.data_vars:
            assert ours[name].dims == theirs[name].dims
            for dim in ours[name].dims:
                if dim not in ("chain", "draw"):
                    assert list(ours[dim].values) == list(theirs[dim].values)
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 10
    assert idata.posterior["asymptote_effect"].dims == ("chain", "draw", "variety")

    stats = idata.sample_stats
    assert set(SAMPLE_STATS) <= set(stats.data_vars)
    for name in SAMPLE_STATS:
        assert stats[name].dims == ("chain", "draw")
    assert stats["diverging"].dtype == bool
    assert np.isfinite(stats["energy"]).all() and np.isfinite(stats["lp"]).all()
    assert az.bfmi(idata).shape == (2,)
    assert idata.posterior.attrs["engine"] == "nuts"

    path = tmp_path / "nuts.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    for group in ("posterior", "sample_stats", "log_likelihood"):
        for name in idata[group].data_vars:
            np.testing.assert_array_equal(loaded[group][name].values, idata[group][name].values)


def test_fit_result_table_history_and_warnings(quick_orange):
    table = quick_orange.population_summary
    assert list(table.index) == ["asymptote", "inflection", "scale", "asymptote_sd", "noise_sd"]
    assert {"mean", "sd", "hdi_5%", "hdi_95%", "ess_bulk", "ess_tail", "r_hat"} <= set(table)
    assert quick_orange.engine == "nuts"
    assert list(quick_orange.history["chain"]) == [0, 1]
    assert (quick_orange.history["wall_s"] > 0).all()
    # 10 draws per chain cannot converge: the warnings must say so.
    assert any("r_hat" in message for message in quick_orange.warnings)
    assert "r_hat" in quick_orange.report()


def test_warnings_name_divergences_and_saturated_trees():
    rng = np.random.default_rng(0)
    diverging = np.zeros((2, 50), dtype=bool)
    diverging[1, [3, 17]] = True
    idata = az.from_dict(
        posterior={"mu": rng.normal(size=(2, 50))},
        sample_stats={"diverging": diverging, "tree_depth": np.full((2, 50), 10)},
    )
    table = pd.DataFrame({"r_hat": [1.0]}, index=["mu"])
    structure = ModelStructure(population={"mu": SiteInfo("mu", (), 0, {})})
    messages = sampler_warnings(idata, table, NUTSConfig(chains=2, max_tree_depth=10), structure)
    assert any(m.startswith("2 divergent transition(s)") for m in messages)
    assert any("100 draw(s) hit max_tree_depth=10" in m for m in messages)


def test_reparametrised_draws_are_recovered_on_the_centred_sites():
    data = load_orange()
    assert reparametrised_sites(orange, data) == ["asymptote_effect"]
    reparam_model = pyro.poutine.reparam(
        orange, config={"asymptote_effect": pyro.infer.reparam.LocScaleReparam(0.0)}
    )
    decentred = torch.randn(3, 5, 1, 1, 1)
    samples = {
        "asymptote": torch.full((3,), 190.0),
        "inflection": torch.full((3,), 700.0),
        "scale": torch.full((3,), 350.0),
        "asymptote_sd": torch.tensor([10.0, 20.0, 30.0]),
        "noise_sd": torch.full((3,), 8.0),
        "asymptote_effect_decentered": decentred,
    }
    recovered = recover_centred(reparam_model, data, samples, ["asymptote_effect"])
    expected = samples["asymptote_sd"][:, None, None, None, None] * decentred
    torch.testing.assert_close(recovered["asymptote_effect"], expected)


def test_noncentred_sites_are_sampled_non_centred_and_exported_centred():
    import json

    data = load_orange()
    _, sites = non_centred(orange, data, ("asymptote",))
    assert sites == ["asymptote_effect", "asymptote"]
    for bad in ("asymptote_sd", "no_such_site"):  # HalfCauchy; absent
        with pytest.raises(ValueError, match=bad):
            non_centred(orange, data, (bad,))
    config = dataclasses.replace(QUICK, reparam=False, noncentred_sites=("asymptote_effect",))
    fit = fit_nuts(orange, data, config)
    settings = json.loads(fit.inference_data.posterior.attrs["settings"])
    assert settings["reparametrised_sites"] == ["asymptote_effect"]
    assert fit.inference_data.posterior["asymptote_effect"].dims == ("chain", "draw", "variety")


@pytest.fixture(scope="module")
def orange_nuts():
    """The exact posterior of Orange, its MLE, and a NUTS fit of it (2 chains x 400 draws)."""
    from pyro_nlme.reference import exact_mle
    from pyro_nlme.reference.exact_posterior import exact_posterior

    data = load_orange()
    # float64: the Laplace start's L-BFGS stalls in float32 on Orange's scales (docs/nuts.md).
    data64 = dataclasses.replace(
        data,
        times=data.times.double(),
        values=data.values.double(),
        covariate_design=data.covariate_design.double(),
    )
    # Centred (reparam=False) with the dense mass matrix: 7 measurements per tree pin each
    # asymptote + effect, a linear ridge the dense metric absorbs.
    config = NUTSConfig(chains=2, warmup=300, samples=400, reparam=False, progress=False)
    fit = fit_nuts(orange, data64, config)
    return exact_posterior(orange, data), exact_mle(data), fit


@pytest.mark.slow
def test_orange_posterior_is_the_exact_posterior_whose_mode_is_the_mle(orange_nuts):
    exact, mle, fit = orange_nuts
    names = list(exact.names)
    mle_values = np.array([mle.estimate[n] for n in names])
    mle_se = np.array([mle.standard_error[n] for n in names])
    # 1. The posterior mode is the MLE: the priors are vague (exact MAP within 0.1 SE of MLE).
    np.testing.assert_array_less(np.abs(exact.mode - mle_values) / mle_se, 0.1)

    # 2. NUTS samples that posterior: means within Monte-Carlo error of the exact ones.
    table = fit.population_summary.loc[names]
    assert int(fit.inference_data.sample_stats["diverging"].sum()) == 0, fit.warnings
    assert (table["r_hat"] <= 1.01).all(), table
    error = np.sqrt(table["mcse_mean"].to_numpy() ** 2 + exact.mean_se**2)
    z = (table["mean"].to_numpy() - exact.mean) / error
    assert (np.abs(z) < 4).all(), dict(zip(names, z, strict=True))

    # 3. Means within 0.2 posterior SD of the MLE: true of the exact posterior only for the
    # asymptote (0.01 SD). With 5 trees the posterior is skewed: the exact means are 0.22
    # (inflection), 0.21 (scale), 0.71 (asymptote_sd) and 0.54 (noise_sd) SD above the MLE,
    # so the requirement does not hold for them whatever the sampler (docs/nuts.md).
    shift = (exact.mean - mle_values) / exact.sd
    assert abs(shift[0]) < 0.2
    assert abs(table["mean"]["asymptote"] - mle_values[0]) < 0.2 * table["sd"]["asymptote"]
    assert shift[3] > 0.5 and shift[4] > 0.4


@pytest.mark.slow
def test_orange_posterior_quantiles_are_the_exact_ones(orange_nuts):
    """NUTS's marginal quantiles (5, 25, 50, 75, 95%) within 4 combined Monte-Carlo SEs
    (ArviZ's quantile MCSE and the importance-sampling SE) of the exact ones. Not the SDs:
    those of ``asymptote`` and ``asymptote_sd`` rest on a tail of about ``sd ** -6`` whose
    fourth moment barely exists (:class:`~pyro_nlme.reference.exact_posterior.ExactPosterior`);
    800 draws gave an asymptote SD of 21.3 against 27-28, with an MCSE of 0.8 that cannot see
    the unvisited tail."""
    from pyro_nlme.reference.exact_posterior import QUANTILE_PROBS

    exact, _, fit = orange_nuts
    names = list(exact.names)
    posterior = fit.inference_data.posterior[names]
    for row, prob in enumerate(QUANTILE_PROBS):
        found = posterior.quantile(prob, dim=("chain", "draw"))
        mcse = az.mcse(posterior, method="quantile", prob=prob)
        z = {
            name: (float(found[name]) - exact.quantiles[row, i])
            / np.hypot(float(mcse[name]), exact.quantile_se[row, i])
            for i, name in enumerate(names)
        }
        assert all(abs(value) < 4 for value in z.values()), (prob, z)


@pytest.fixture(scope="module")
def small_design():
    from pyro_nlme.data import load_data
    from pyro_nlme.simulate import DesignConfig, simulate_design

    config = DesignConfig(
        n_varieties=6, n_markers=60, n_plants=1, n_days=21, n_chromosomes=3, missing_rate=0.05
    )
    sim = simulate_design(config, seed=0)
    return load_data(sim.phenotypes, markers=sim.genotype_table()), sim.truth


@pytest.mark.extended
def test_small_simulated_design_centred_kinship_form_converges_and_covers_truth(small_design):
    """6 varieties x 3 scenarios x 21 days, centred kinship form sampled as written except the
    genetic values' eigen-components: each curve is pinned by its 21 days, so the centred curve
    parameters are well-conditioned coordinates (non-centred, the trees hit the depth cap of
    10), while 6 varieties inform the 5 components weakly (centred: a funnel, 13 divergences
    on the coverage benchmark's seed 1; docs/nuts.md)."""
    from scipy.stats import binom

    from pyro_nlme_models.g2was import g2was

    data, truth = small_design
    config = NUTSConfig(
        chains=2,
        warmup=200,
        samples=900,
        init_refine_steps=1000,
        reparam=False,
        noncentred_sites=("genetic_value_component",),
        progress=False,
    )
    model_kwargs = {"marker_form": "kinship", "parametrization": "centred"}
    fit = fit_nuts(g2was, data, config, model_kwargs=model_kwargs)
    idata = fit.inference_data
    assert int(idata.sample_stats["diverging"].sum()) == 0, fit.warnings
    names = ["scenario_mean", "genetic_sd", "variety_scenario_sd", "noise_sd", "genetic_value"]
    r_hat = az.rhat(idata, var_names=[*names, "variety_scenario_parameter"])
    worst = {name: float(r_hat[name].max()) for name in r_hat.data_vars}
    assert max(worst.values()) <= 1.01, worst
    assert idata.posterior["genetic_value"].dims == ("chain", "draw", "variety", "curve_parameter")

    # The truth of what the data identify: every curve's parameters (54) and the noise SD.
    phi = idata.posterior["variety_scenario_parameter"]  # one plant: no plant level
    labels = {dim: phi[dim].values for dim in phi.dims[2:]}
    true_phi = truth["individual_parameter"].squeeze("plant", drop=True).sel(labels)
    true_phi = true_phi.transpose(*phi.dims[2:])
    lower = phi.quantile(0.05, dim=("chain", "draw")).values
    upper = phi.quantile(0.95, dim=("chain", "draw")).values
    inside = int(((lower <= true_phi.values) & (true_phi.values <= upper)).sum())
    # Calibrated 90% intervals: about Binomial(54, 0.9) covered; P(fewer than 41) = 7e-4.
    assert inside >= binom.ppf(1e-3, true_phi.size, 0.9), (inside, true_phi.size)
    z = (phi.mean(("chain", "draw")).values - true_phi.values) / phi.std(("chain", "draw")).values
    assert float(np.abs(z).max()) < 4, z  # 54 z-scores: P(any |z| > 4) = 3e-3
    noise = idata.posterior["noise_sd"]
    noise_z = (float(noise.mean()) - float(truth["noise_sd"])) / float(noise.std())
    assert abs(noise_z) < 4, noise_z
