"""``observe`` applies what the data carry: binomial trials, censoring, and the support check."""

from __future__ import annotations

import pandas as pd
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_nlme.data import DataError, load_data
from pyro_nlme.model import observe, plant_plate, scenario_plate, time_plate, variety_plate
from pyro_nlme.model.censoring import Censored
from pyro_nlme.model.observations import observation_model


def observed_site(data, distribution_of):
    """The trace node of ``obs`` for a model whose distribution is ``distribution_of(shape)``."""

    def model():
        with variety_plate(data) as idx:
            batch = data.subset(idx)
            with scenario_plate(data), plant_plate(data), time_plate(data):
                observe(batch, distribution_of(batch.times))

    return poutine.trace(model).get_trace().nodes["obs"]


def frame(values, **columns) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame({"variety": ["A"] * n, "time": range(n), "value": values, **columns})


def test_binomial_takes_its_trials_from_the_data():
    data = load_data(frame([0, 3, 5], trials=[4, 5, 5]))
    binomial = observation_model("binomial")
    site = observed_site(data, lambda t: binomial.distribution(torch.full_like(t, 0.7), {}))
    assert site["fn"].base_dist.total_count.tolist() == [[[[4.0, 5.0, 5.0]]]]
    expected = dist.Binomial(torch.tensor([4.0, 5.0, 5.0]), probs=1 - torch.exp(torch.tensor(-0.7)))
    torch.testing.assert_close(
        site["fn"].log_prob(site["value"]).flatten(), expected.log_prob(torch.tensor([0.0, 3, 5]))
    )


def test_trials_column_with_another_model_is_an_error():
    data = load_data(frame([0, 3], trials=[4, 5]))
    with pytest.raises(
        ValueError, match="'trials' column.*but the model's distribution is Poisson"
    ):
        observed_site(data, lambda t: dist.Poisson(torch.ones_like(t)))


def test_censored_data_wrap_the_distribution_and_plain_data_do_not():
    censored = load_data(frame([0.5, 2.0], cens=[1, 0]))
    site = observed_site(censored, lambda t: dist.Normal(torch.ones_like(t), 1.0))
    assert isinstance(site["fn"].base_dist, Censored)
    plain = load_data(frame([0.5, 2.0]))
    site = observed_site(plain, lambda t: dist.Normal(torch.ones_like(t), 1.0))
    assert isinstance(site["fn"].base_dist, dist.Normal)


@pytest.mark.parametrize(
    "likelihood, values, bad",
    [
        ("poisson", [0, 2.5, 3], "2.5"),
        ("negative_binomial", [0, -1, 3], "-1"),
        ("bernoulli", [0, 2, 1], "2"),
        ("ordinal:3", [0, 3, 1], "3"),
        ("lognormal", [1.0, 0.0, 3.0], "0"),
    ],
)
def test_values_outside_the_support_are_named(likelihood, values, bad):
    data = load_data(frame(values))
    model = observation_model(likelihood)
    noise = {
        "noise_sd": torch.tensor(1.0),
        "noise_overdispersion": torch.tensor(0.5),
        "noise_cutpoints": torch.tensor([0.0, 1.0]),
    }
    with pytest.raises(DataError) as info:
        observed_site(data, lambda t: model.distribution(torch.ones_like(t), noise))
    message = str(info.value)
    for part in ("DataFrame", "column 'value'", "variety 'A'", "time 1", f": {bad}"):
        assert part in message, (part, message)


def test_binomial_without_trials_column_hints_at_it():
    data = load_data(frame([0, 3]))
    binomial = observation_model("binomial")
    with pytest.raises(DataError, match="from a 'trials' column"):
        observed_site(data, lambda t: binomial.distribution(torch.ones_like(t), {}))
