"""Observation models: log-densities against scipy.stats, noise sites, the name registry."""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_nlme.model.censoring import Censored, student_t_log_cdf
from pyro_nlme.model.observations import (
    OBSERVATION_MODELS,
    Combined,
    LogNormal,
    Normal,
    Ordinal,
    Power,
    Proportional,
    cumulative_hazard_logits,
    observation_model,
    ordinal_log_probs,
)

PREDICTION = np.array([[0.5, 3.0, 40.0], [120.0, 7.5, 1.0]])
OBSERVED = np.array([[0.7, 2.5, 43.0], [110.0, 8.0, 0.9]])
NOISE = {"noise_sd": 0.3, "noise_cv": 0.15, "noise_power": 0.7}


def scipy_log_prob(name: str) -> np.ndarray:
    f, y = PREDICTION, OBSERVED
    sd, cv, power = NOISE["noise_sd"], NOISE["noise_cv"], NOISE["noise_power"]
    if name == "normal":
        return stats.norm.logpdf(y, loc=f, scale=sd)
    if name == "lognormal":
        return stats.lognorm.logpdf(y, s=sd, scale=f)
    if name == "proportional":
        return stats.norm.logpdf(y, loc=f, scale=cv * np.abs(f))
    if name == "combined":
        return stats.norm.logpdf(y, loc=f, scale=np.sqrt(sd**2 + (cv * f) ** 2))
    if name == "power":
        return stats.norm.logpdf(y, loc=f, scale=sd * np.abs(f) ** power)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["normal", "lognormal", "proportional", "combined", "power"])
def test_log_prob_equals_scipy(name):
    model = observation_model(name)
    noise = {k: torch.tensor(v, dtype=torch.float64) for k, v in NOISE.items()}
    distribution = model.distribution(torch.tensor(PREDICTION), noise)
    assert distribution.batch_shape == PREDICTION.shape
    log_prob = distribution.log_prob(torch.tensor(OBSERVED))
    np.testing.assert_allclose(log_prob.numpy(), scipy_log_prob(name), rtol=1e-10)


def test_lognormal_uses_the_log_prediction_when_given():
    noise = {"noise_sd": torch.tensor(0.3, dtype=torch.float64)}
    log_prediction = torch.tensor([-200.0, 0.0, 3.0], dtype=torch.float64)
    observed = np.array([1e-80, 1.0, 25.0])
    distribution = LogNormal().distribution(log_prediction.exp(), noise, log_prediction)
    expected = stats.norm.logpdf(np.log(observed), loc=log_prediction.numpy(), scale=0.3)
    expected -= np.log(observed)
    log_prob = distribution.log_prob(torch.tensor(observed))
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-10)
    # Without it, the log of an underflowed float32 prediction is floored, far from the truth.
    floored = LogNormal().distribution(log_prediction.float().exp(), noise)
    assert floored.loc[0] > -100


@pytest.mark.parametrize("name", ["normal", "proportional", "combined", "power"])
def test_other_models_accept_and_ignore_the_log_prediction(name):
    model = observation_model(name)
    noise = {k: torch.tensor(v, dtype=torch.float64) for k, v in NOISE.items()}
    prediction = torch.tensor(PREDICTION)
    with_log = model.distribution(prediction, noise, log_prediction=prediction.log())
    without = model.distribution(prediction, noise)
    observed = torch.tensor(OBSERVED)
    torch.testing.assert_close(with_log.log_prob(observed), without.log_prob(observed))


@pytest.mark.parametrize(
    "name, sites",
    [
        ("normal", ["noise_sd"]),
        ("lognormal", ["noise_sd"]),
        ("proportional", ["noise_cv"]),
        ("combined", ["noise_sd", "noise_cv"]),
        ("power", ["noise_sd", "noise_power"]),
    ],
)
def test_sample_noise_sites_are_scalar_population_sites(name, sites):
    model = observation_model(name)
    trace = poutine.trace(model.sample_noise).get_trace()
    sampled = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert sampled == sites
    for site in sites:
        assert trace.nodes[site]["value"].shape == ()
        assert trace.nodes[site]["cond_indep_stack"] == ()


def test_noise_prior_scales_are_passed_through():
    model = observation_model("normal", noise_scale=7.0)
    assert model == Normal(noise_scale=7.0)
    trace = poutine.trace(model.sample_noise).get_trace()
    assert trace.nodes["noise_sd"]["fn"].scale == 7.0


def test_scales_stay_valid_where_the_prediction_underflows():
    zero = torch.zeros(3)
    noise = {k: torch.tensor(v) for k, v in NOISE.items()}
    for model in (LogNormal(), Proportional(), Combined(), Power()):
        log_prob = model.distribution(zero, noise).log_prob(torch.full((3,), 0.5))
        assert not torch.isnan(log_prob).any(), model.name


def test_registry_and_unknown_name():
    assert set(OBSERVATION_MODELS) == {
        "normal",
        "lognormal",
        "proportional",
        "combined",
        "power",
        "student_t",
        "log_student_t",
        "poisson",
        "negative_binomial",
        "bernoulli",
        "binomial",
        "ordinal",
    }
    assert isinstance(observation_model("power"), Power)
    custom = Combined(noise_scale=2.0)
    assert observation_model(custom) is custom
    with pytest.raises(ValueError, match="unknown likelihood 'gamma'.*normal"):
        observation_model("gamma")
    assert observation_model("ordinal:4") == Ordinal(4)
    with pytest.raises(ValueError, match="number of categories, e.g. 'ordinal:5'"):
        observation_model("ordinal")
    with pytest.raises(ValueError, match="takes no argument"):
        observation_model("poisson:3")
    with pytest.raises(ValueError, match="n_categories >= 2"):
        observation_model("ordinal:1")


COUNTS = np.array([[0.0, 2.0, 41.0], [118.0, 7.0, 1.0]])


@pytest.mark.parametrize("name", ["student_t", "log_student_t"])
def test_student_t_log_prob_equals_scipy(name):
    noise = {"noise_sd": torch.tensor(0.3, dtype=torch.float64), "noise_df": torch.tensor(4.5)}
    distribution = observation_model(name).distribution(torch.tensor(PREDICTION), noise)
    log_prob = distribution.log_prob(torch.tensor(OBSERVED)).numpy()
    if name == "student_t":
        expected = stats.t.logpdf(OBSERVED, 4.5, loc=PREDICTION, scale=0.3)
    else:
        expected = stats.t.logpdf(np.log(OBSERVED), 4.5, np.log(PREDICTION), 0.3)
        expected -= np.log(OBSERVED)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6)


def test_count_models_log_prob_equal_scipy():
    f = torch.tensor(PREDICTION)
    poisson = observation_model("poisson").distribution(f, {}, log_prediction=f.log())
    np.testing.assert_allclose(
        poisson.log_prob(torch.tensor(COUNTS)).numpy(), stats.poisson.logpmf(COUNTS, PREDICTION)
    )
    overdispersion = 0.4
    noise = {"noise_overdispersion": torch.tensor(overdispersion, dtype=torch.float64)}
    nb = observation_model("negative_binomial").distribution(f, noise)
    r = 1 / overdispersion
    expected = stats.nbinom.logpmf(COUNTS, r, r / (r + PREDICTION))
    np.testing.assert_allclose(nb.log_prob(torch.tensor(COUNTS)).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(nb.mean.numpy(), PREDICTION, rtol=1e-12)
    np.testing.assert_allclose(nb.variance.numpy(), PREDICTION + overdispersion * PREDICTION**2)


def test_poisson_scores_from_the_log_prediction():
    log_f = torch.tensor([-150.0, 2.0], dtype=torch.float64)
    poisson = observation_model("poisson").distribution(log_f.float().exp(), {}, log_f)
    log_prob = poisson.log_prob(torch.tensor([1.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(log_prob[0].item(), -150.0, rtol=1e-12)  # exp(-150) underflows


def test_cumulative_hazard_link_is_exact_and_never_clamped():
    f = torch.tensor([1e-30, 1e-6, 0.3, 1.0, 2.5, 40.0], dtype=torch.float64)
    logits = cumulative_hazard_logits(f)
    np.testing.assert_allclose(logits.numpy(), np.log(np.expm1(f.numpy())), rtol=1e-12)
    log_f = torch.tensor([-300.0])
    assert cumulative_hazard_logits(log_f.exp(), log_f).item() == pytest.approx(-300.0)
    probs = observation_model("bernoulli").distribution(f, {}).probs
    np.testing.assert_allclose(probs.numpy(), -np.expm1(-f.numpy()), rtol=1e-10)


def test_ordinal_probabilities_equal_the_cumulative_logit():
    cutpoints = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    eta = torch.tensor([-3.0, 0.0, 1.2, 40.0], dtype=torch.float64)
    model = observation_model("ordinal:4")
    probs = model.distribution(eta, {"noise_cutpoints": cutpoints}).probs.numpy()
    cumulative = 1 / (1 + np.exp(-(cutpoints.numpy()[None] - eta.numpy()[:, None])))
    expected = np.diff(np.concatenate([np.zeros((4, 1)), cumulative, np.ones((4, 1))], 1), axis=1)
    np.testing.assert_allclose(probs, expected, rtol=1e-9, atol=1e-300)
    far = ordinal_log_probs(torch.tensor([-200.0, 200.0]), cutpoints.float())
    assert torch.isfinite(far).all()  # differences of probabilities would give log(0)


def test_ordinal_cutpoints_prior_is_proper_and_ordered():
    model = observation_model("ordinal:5")
    trace = poutine.trace(model.sample_noise).get_trace()
    site = trace.nodes["noise_cutpoints"]
    assert site["value"].shape == (4,)
    draws = site["fn"].sample((2000,))
    assert (draws.diff(dim=-1) > 0).all()
    assert torch.isfinite(site["fn"].log_prob(draws)).all()


def _t_log_cdf_reference(df: float, z: float) -> float:
    """log P(T <= z) to 40 digits (mpmath, a dependency of torch's sympy)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        x = mpmath.mpf(df) / (df + mpmath.mpf(z) ** 2)
        tail = mpmath.betainc(mpmath.mpf(df) / 2, 0.5, 0, x, regularized=True) / 2
        return float(mpmath.log(tail) if z < 0 else mpmath.log1p(-tail))


def test_student_t_log_cdf_equals_a_high_precision_reference():
    df = torch.tensor([0.5, 1.0, 2.5, 5.0, 30.0, 200.0, 5000.0], dtype=torch.float64)[:, None]
    z = torch.tensor([-60, -8, -2, -0.3, -1e-9, 0.3, 2, 8, 60], dtype=torch.float64)
    df, z = torch.broadcast_tensors(df, z)
    expected = np.vectorize(_t_log_cdf_reference)(df.numpy(), z.numpy())
    np.testing.assert_allclose(student_t_log_cdf(df, z).numpy(), expected, rtol=1e-9)
    df_grad, z_grad = df.clone().requires_grad_(), z.clone().requires_grad_()
    student_t_log_cdf(df_grad, z_grad).sum().backward()
    assert torch.isfinite(df_grad.grad).all() and torch.isfinite(z_grad.grad).all()
    # Far tails, where log(cdf) would underflow: the exact asymptote of the t tail.
    tail = student_t_log_cdf(torch.tensor([3.0], dtype=torch.float64), torch.tensor([-1e12]))
    assert tail.item() == pytest.approx(stats.t.logsf(1e6, 3.0) - 3 * np.log(1e6), rel=1e-6)


@pytest.mark.parametrize("name", ["normal", "lognormal", "student_t", "log_student_t"])
def test_censored_log_prob_equals_the_analytic_cdf(name):
    noise = {"noise_sd": torch.tensor(0.4, dtype=torch.float64), "noise_df": torch.tensor(3.0)}
    f = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    inf = np.inf
    lower = np.array([-inf, 2.5, 1.0, -inf, 0.01, 60.0])
    upper = np.array([1.0, inf, 3.0, 1e-8, inf, 61.0])
    log_scale = name.startswith("log")
    frozen = (stats.t(3.0, 0.0, 0.4) if "student" in name else stats.norm(0.0, 0.4)).cdf
    with np.errstate(divide="ignore"):  # log(0) where scipy's CDF underflows
        expected = _censored_reference(lower, upper, frozen, log_scale)
    distribution = observation_model(name).distribution(f, noise)
    code = torch.tensor([1, -1, 1, 1, -1, -1], dtype=torch.int8)
    censored = Censored(distribution, code, torch.tensor(lower), torch.tensor(upper))
    log_prob = censored.log_prob(torch.where(code > 0, torch.tensor(upper), torch.tensor(lower)))
    finite = np.isfinite(expected)  # the far tails underflow in scipy, not here
    np.testing.assert_allclose(log_prob.numpy()[finite], expected[finite], rtol=1e-7, atol=1e-30)
    assert torch.isfinite(log_prob).all()


def _censored_reference(lower, upper, cdf, log_scale: bool) -> np.ndarray:
    """log P(lower <= y <= upper) from scipy's CDF of the standardised error (f = 2)."""
    centre = np.log(2.0) if log_scale else 2.0

    def at(x):
        x = np.log(np.maximum(x, 0.0)) if log_scale else x
        return cdf(x - centre)

    return np.log(at(upper) - at(lower))


def test_far_tail_censoring_is_finite_and_matches_the_log_cdf():
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
    censored = Censored(
        dist.Normal(normal.loc, normal.scale),
        torch.tensor([1, -1], dtype=torch.int8),
        torch.tensor([-40.0, 40.0], dtype=torch.float64),
        torch.tensor([-39.0, 41.0], dtype=torch.float64),
    )
    log_prob = censored.log_prob(torch.tensor([-39.0, 40.0], dtype=torch.float64))
    # P(-40 < y < -39) = P(39 < y < 40) and P(40 < y < 41), from scipy's log CDF.
    expected = [
        stats.norm.logcdf(-39) + np.log1p(-np.exp(stats.norm.logcdf(-40) - stats.norm.logcdf(-39))),
        stats.norm.logcdf(-40) + np.log1p(-np.exp(stats.norm.logcdf(-41) - stats.norm.logcdf(-40))),
    ]
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-10)


def test_uncensored_cells_keep_the_base_density_and_gradients_are_finite():
    loc = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    base = dist.Normal(loc, 1.0)
    code = torch.tensor([0, 1, -1], dtype=torch.int8)
    lower = torch.tensor([-np.inf, -np.inf, 0.5])
    upper = torch.tensor([np.inf, -0.5, np.inf])
    log_prob = Censored(base, code, lower, upper).log_prob(torch.tensor([0.3, -0.5, 0.5]))
    expected = [stats.norm.logpdf(0.3), stats.norm.logcdf(-0.5), stats.norm.logsf(0.5)]
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-6)
    log_prob.sum().backward()
    assert torch.isfinite(loc.grad).all()


def test_censored_sample_records_the_bound():
    base = dist.Normal(torch.zeros(3), 1.0)
    code = torch.tensor([1, -1, 0], dtype=torch.int8)
    lower = torch.tensor([-np.inf, 0.0, -np.inf])
    upper = torch.tensor([0.0, np.inf, np.inf])
    draws = Censored(base, code, lower, upper).sample((4000,))
    assert ((draws[:, 0] == 0) | (draws[:, 0] > 0)).all()
    assert (draws[:, 0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert ((draws[:, 1] == 0) | (draws[:, 1] < 0)).all()
    assert (draws[:, 2] != 0).all()


def test_censoring_a_model_without_cdf_is_an_error():
    base = dist.Beta(torch.ones(2), 1.0)
    code = torch.tensor([1, 0], dtype=torch.int8)
    censored = Censored(base, code, torch.full((2,), -np.inf), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="Beta has no CDF"):
        censored.log_prob(torch.ones(2))
