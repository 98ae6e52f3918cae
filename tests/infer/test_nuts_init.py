"""The Laplace start of NUTS chains: exact on Gaussian posteriors, mapped correctly from the
non-centred search space, and handed to Pyro's mass-matrix adapter as given."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.reparam import LocScaleReparam

from pyro_nlme.infer.nuts import RecordingNUTS
from pyro_nlme.infer.nuts_init import init_to_prior_median, laplace_start

Y = torch.tensor([1.3, -0.4, 2.2], dtype=torch.float64)


def linear_gaussian(data: torch.Tensor) -> None:
    """a ~ N(1, 3), b ~ N(a, 0.5), y_i ~ N(a + b, 0.8): a Gaussian posterior with correlated
    (a, b), whose Laplace approximation is exact."""
    a = pyro.sample("a", dist.Normal(torch.tensor(1.0, dtype=torch.float64), 3.0))
    b = pyro.sample("b", dist.Normal(a, 0.5))
    with pyro.plate("obs_plate", len(data)):
        pyro.sample("y", dist.Normal(a + b, 0.8), obs=data)


def exact_posterior() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of (a, b) given Y, by Gaussian conditioning."""
    prior_mean = torch.tensor([1.0, 1.0], dtype=torch.float64)
    prior_cov = torch.tensor([[9.0, 9.0], [9.0, 9.25]], dtype=torch.float64)
    design = torch.ones(len(Y), 2, dtype=torch.float64)
    precision = torch.linalg.inv(prior_cov) + design.T @ design / 0.64
    covariance = torch.linalg.inv(precision)
    mean = covariance @ (torch.linalg.solve(prior_cov, prior_mean) + design.T @ Y / 0.64)
    return mean, covariance


def test_prior_median_is_exact_not_a_median_of_draws():
    def model():
        pyro.sample("loc", dist.Normal(214.0, 2140.0))
        pyro.sample("sd", dist.HalfCauchy(21.4))
        pyro.sample("rate", dist.LogNormal(torch.tensor(2.0), 3.0).expand([2]).to_event(1))

    trace = poutine.trace(model).get_trace()
    values = {name: init_to_prior_median(trace.nodes[name]) for name in ("loc", "sd", "rate")}
    torch.testing.assert_close(values["loc"], torch.tensor(214.0))
    torch.testing.assert_close(values["sd"], torch.tensor(21.4))
    torch.testing.assert_close(values["rate"], torch.full((2,), 2.0).exp())


def test_laplace_start_is_the_exact_gaussian_posterior():
    mean, covariance = exact_posterior()
    start = laplace_start(linear_gaussian, Y, dense=True)
    order = [start.index["a"].start, start.index["b"].start]
    torch.testing.assert_close(start.loc[order], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(start.covariance[order][:, order], covariance, rtol=1e-6, atol=0)
    # The diagonal form is the inverse of the Hessian's diagonal: the conditional variances.
    diagonal = laplace_start(linear_gaussian, Y, dense=False)
    torch.testing.assert_close(
        diagonal.covariance[order], 1 / torch.linalg.inv(covariance).diagonal(), rtol=0.15, atol=0
    )
    blocks = start.inverse_mass_matrix({("b", "a"): True})
    torch.testing.assert_close(blocks[("b", "a")], covariance.flip(0, 1), rtol=1e-6, atol=0)


def hierarchy(data: torch.Tensor) -> None:
    """Centred: sd ~ HalfNormal(2), effect_i ~ N(0, sd), y_ij ~ N(effect_i, 0.3)."""
    sd = pyro.sample("sd", dist.HalfNormal(torch.tensor(2.0, dtype=torch.float64)))
    with pyro.plate("group", data.shape[0], dim=-2):
        effect = pyro.sample("effect", dist.Normal(0.0, sd))
        with pyro.plate("rep", data.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(effect, 0.3), obs=data)


def test_mode_of_the_non_centred_form_is_mapped_to_the_centred_sites():
    data = torch.tensor([[1.0, 1.2], [-0.5, -0.7], [2.0, 2.1]], dtype=torch.float64)
    non_centred = poutine.reparam(hierarchy, config={"effect": LocScaleReparam(0.0)})
    search = laplace_start(non_centred, data, dense=True)
    start = laplace_start(hierarchy, data, dense=True, search_model=non_centred)
    sd = search.loc[search.index["sd"]].exp()
    torch.testing.assert_close(start.loc[start.index["sd"]], search.loc[search.index["sd"]])
    torch.testing.assert_close(
        start.loc[start.index["effect"]], sd * search.loc[search.index["effect_decentered"]]
    )
    # The pushed-forward covariance is a covariance, and it has the data's pin on each effect.
    assert torch.linalg.eigvalsh(start.covariance).min() > 0
    effect_sd = start.covariance.diagonal()[start.index["effect"]].sqrt()
    assert (effect_sd < 0.3).all()


def test_recording_nuts_starts_with_the_given_inverse_mass_matrix():
    start = laplace_start(linear_gaussian, Y, dense=True)
    kernel = RecordingNUTS(
        linear_gaussian, full_mass=True, initial_inverse_mass=start.inverse_mass_matrix
    )
    kernel.setup(10, Y)
    ((sites, matrix),) = kernel.inverse_mass_matrix.items()
    torch.testing.assert_close(matrix, start.inverse_mass_matrix({sites: True})[sites])
    draw = start.draw(torch.Generator().manual_seed(0))
    assert set(draw) == {"a", "b"} and draw["a"].shape == ()


def test_refined_start_is_the_mean_field_fit_of_the_gaussian_posterior():
    # Mean-field VI on a Gaussian posterior has the exact means and the conditional variances
    # 1 / precision_ii; 400 stochastic steps get within a fraction of a posterior SD of them.
    mean, covariance = exact_posterior()
    start = laplace_start(linear_gaussian, Y, dense=False, refine_steps=400)
    order = [start.index["a"].start, start.index["b"].start]
    sd = covariance.diagonal().sqrt()
    assert ((start.loc[order] - mean).abs() < 0.25 * sd).all(), (start.loc[order], mean)
    conditional = 1 / torch.linalg.inv(covariance).diagonal()
    torch.testing.assert_close(start.covariance[order], conditional, rtol=0.3, atol=0)


def test_diagonal_start_from_a_search_space_is_the_pushed_forward_variance():
    # 60 well-observed groups: in the centred form the SD's Hessian row couples it to every
    # effect, the kind of Hessian whose Hutchinson diagonal went negative on the target design
    # (variance clamped to 1e8). The diagonal start must be the dense pushforward's diagonal
    # up to its draws' error (relative SE sqrt(2 / 199) = 0.10; 0.45 is 4.5 SEs).
    generator = torch.Generator().manual_seed(1)
    effects = 2.0 * torch.randn(60, 1, generator=generator, dtype=torch.float64)
    data = effects + 0.3 * torch.randn(60, 4, generator=generator, dtype=torch.float64)
    non_centred = poutine.reparam(hierarchy, config={"effect": LocScaleReparam(0.0)})
    settings = {"search_model": non_centred, "refine_steps": 300}
    dense = laplace_start(hierarchy, data, dense=True, **settings)
    diagonal = laplace_start(hierarchy, data, dense=False, **settings)
    torch.testing.assert_close(diagonal.loc, dense.loc)
    torch.testing.assert_close(diagonal.covariance, dense.covariance.diagonal(), rtol=0.45, atol=0)
