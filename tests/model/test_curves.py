"""Growth curves: values at known points, stable gradients at extreme arguments, parameter
names read off the signature."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_nlme.model.curves import (
    CURVES,
    curve_parameter_names,
    exponential,
    gompertz,
    log_logistic,
    logistic,
    monomolecular,
    richards,
)

DOUBLE = dict(dtype=torch.float64)


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, **DOUBLE)


def test_logistic_known_points():
    asymptote, rate, inflection = t(150.0), t(0.3), t(10.0)
    assert logistic(t(10.0), asymptote, rate, inflection) == pytest.approx(75.0)
    time = t([0.0, 5.0, 20.0])
    expected = 150.0 / (1.0 + torch.exp(-0.3 * (time - 10.0)))
    torch.testing.assert_close(logistic(time, asymptote, rate, inflection), expected)
    assert logistic(t(1e4), asymptote, rate, inflection) == pytest.approx(150.0)


def test_log_logistic_is_the_log_of_logistic_without_underflow():
    time = torch.linspace(-50.0, 50.0, 101, **DOUBLE)
    log_asymptote, rate, inflection = t(math.log(150.0)), t(0.3), t(10.0)
    torch.testing.assert_close(
        log_logistic(time, log_asymptote, rate, inflection),
        logistic(time, log_asymptote.exp(), rate, inflection).log(),
    )
    rate = torch.tensor(1.0, requires_grad=True)
    far = log_logistic(torch.tensor(-1e4), torch.tensor(5.0), rate, torch.tensor(10.0))
    assert far.item() == pytest.approx(5.0 - 1e4 - 10.0, rel=1e-6)  # logistic is 0 in float32
    far.backward()
    assert torch.isfinite(rate.grad)


def test_gompertz_known_points():
    asymptote, rate, inflection = t(150.0), t(0.3), t(10.0)
    assert gompertz(t(10.0), asymptote, rate, inflection) == pytest.approx(150.0 / math.e)
    assert gompertz(t(14.0), asymptote, rate, inflection) == pytest.approx(
        150.0 * math.exp(-math.exp(-1.2))
    )


def test_richards_with_shape_one_is_logistic_and_tends_to_gompertz():
    time = torch.linspace(-20.0, 40.0, 61, **DOUBLE)
    args = (t(150.0), t(0.3), t(10.0))
    torch.testing.assert_close(richards(time, *args, t(1.0)), logistic(time, *args))
    torch.testing.assert_close(
        richards(time, *args, t(1e-6)), gompertz(time, *args), atol=1e-3, rtol=1e-4
    )
    shape = t(2.5)
    expected = 150.0 * (1.0 + shape * torch.exp(-0.3 * (time - 10.0))) ** (-1.0 / shape)
    torch.testing.assert_close(richards(time, *args, shape), expected)


def test_monomolecular_is_zero_at_onset():
    asymptote, rate, onset = t(80.0), t(0.2), t(3.0)
    assert monomolecular(t(3.0), asymptote, rate, onset) == 0.0
    assert monomolecular(t(8.0), asymptote, rate, onset) == pytest.approx(
        80.0 * (1.0 - math.exp(-1.0))
    )


def test_exponential():
    assert exponential(t(0.0), t(2.0), t(0.1)) == pytest.approx(2.0)
    assert exponential(t(10.0), t(2.0), t(0.1)) == pytest.approx(2.0 * math.e)


def test_curves_broadcast_over_plates():
    time = torch.linspace(0.0, 20.0, 5).expand(4, 3, 2, 5)
    asymptote = torch.full((4, 1, 1, 1), 100.0)
    rate = torch.full((1, 3, 1, 1), 0.3)
    inflection = torch.full((4, 3, 2, 1), 10.0)
    assert logistic(time, asymptote, rate, inflection).shape == (4, 3, 2, 5)


EXTREME_CASES = [
    (name, delta)
    for name in ("logistic", "gompertz", "richards", "monomolecular")
    for delta in (-1e4, -1e3, 0.0, 1e3, 1e4)
]


@pytest.mark.parametrize("name, delta", EXTREME_CASES)
def test_finite_values_and_gradients_at_extreme_arguments(name, delta):
    curve = CURVES[name]
    parameters = {
        "asymptote": torch.tensor(150.0, requires_grad=True),
        "rate": torch.tensor(1.0, requires_grad=True),
        "inflection": torch.tensor(10.0, requires_grad=True),
        "onset": torch.tensor(10.0, requires_grad=True),
        "shape": torch.tensor(0.5, requires_grad=True),
    }
    arguments = {k: parameters[k] for k in curve_parameter_names(curve)}
    value = curve(torch.tensor(10.0 + delta), **arguments)
    if name == "monomolecular" and delta < 0:
        return  # exponential growth backwards in time: inf is the right answer
    assert torch.isfinite(value)
    value.backward()
    for key, parameter in arguments.items():
        assert torch.isfinite(parameter.grad), (name, key, parameter.grad)


def test_exponential_gradient_is_finite_where_the_value_is():
    rate = torch.tensor(0.1, requires_grad=True)
    exponential(torch.tensor(100.0), torch.tensor(2.0), rate).backward()
    assert torch.isfinite(rate.grad)


def test_curve_parameter_names():
    assert curve_parameter_names(logistic) == ("asymptote", "rate", "inflection")
    assert curve_parameter_names(richards) == ("asymptote", "rate", "inflection", "shape")
    assert curve_parameter_names(monomolecular) == ("asymptote", "rate", "onset")
    assert curve_parameter_names(exponential) == ("initial", "rate")

    def user_curve(time, a, b):
        return a * time + b

    assert curve_parameter_names(user_curve) == ("a", "b")
    with pytest.raises(TypeError, match="time"):
        curve_parameter_names(lambda t, a: a * t)
    assert set(CURVES) == {"logistic", "gompertz", "richards", "monomolecular", "exponential"}
