"""The model convention: plate helpers, the masked ``obs`` site, ``nlme_model`` declarations,
and the user model of docs/model_convention.md loaded from its file as the CLI would."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from pyro_nlme.infer.util import model_structure
from pyro_nlme.model import (
    CURVE_SITE,
    OBSERVED_SITE,
    GrowthScale,
    nlme_model,
    observe,
    plant_plate,
    scenario_plate,
    time_plate,
    variety_plate,
)
from pyro_nlme.model.convention import MISSING_FILL, model_coords, model_event_dims
from pyro_nlme.model.registry import resolve_model

HERE = Path(__file__).parent
USER_MODEL = HERE / "user_gompertz_model.py"
DOC = HERE.parents[1] / "docs" / "model_convention.md"


@pytest.fixture(scope="module")
def user_model():
    """Loaded by path, as ``pyro-nlme fit --model path/to/file.py:function`` loads it."""
    model, name = resolve_model(f"{USER_MODEL}:gompertz")
    assert name == f"{USER_MODEL}:gompertz"
    return model


@pytest.fixture
def masked_orange(orange_data):
    """Orange with cell (tree 2, age slot 3) masked."""
    mask = orange_data.mask.clone()
    mask[1, 0, 0, 3] = False
    return orange_data.with_values(orange_data.values, mask)


def test_plates_have_the_documented_names_sizes_and_dims(simulated_data):
    data = simulated_data
    expected = [
        (variety_plate(data), "variety", 30, -4),
        (scenario_plate(data), "scenario", 3, -3),
        (plant_plate(data), "plant", 2, -2),
        (time_plate(data), "time", 21, -1),
    ]
    for plate, name, size, dim in expected:
        assert (plate.name, plate.size, plate.dim) == (name, size, dim)
    assert variety_plate(data, subsample_size=4).subsample_size == 4
    with variety_plate(data, subsample_size=4) as idx:
        assert idx.shape == (4,) and idx.max() < 30


def tiny_model(batch_values_source, distribution_scale=1.0):
    """Observe a Normal(0, scale) in the four plates of ``batch_values_source``."""

    def model(data):
        with variety_plate(data) as idx:
            batch = data.subset(idx)
            with scenario_plate(data), plant_plate(data), time_plate(data):
                return observe(batch, dist.Normal(torch.zeros_like(batch.times), 1.0))

    return model


def test_observe_masks_and_fills_masked_cells(masked_orange):
    model = tiny_model(masked_orange)
    trace = poutine.trace(model).get_trace(masked_orange)
    site = trace.nodes[OBSERVED_SITE]
    assert site["is_observed"]
    assert site["value"][1, 0, 0, 3] == MISSING_FILL
    assert torch.equal(site["value"][masked_orange.mask], masked_orange.values[masked_orange.mask])
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(masked_orange.values)
    assert trace.log_prob_sum().item() == pytest.approx(expected[masked_orange.mask].sum().item())


def test_a_masked_cell_does_not_change_the_log_density(masked_orange, user_model):
    trace = poutine.trace(user_model).get_trace(masked_orange)

    def log_density(values):
        data = masked_orange.with_values(values, masked_orange.mask)
        return poutine.trace(poutine.replay(user_model, trace=trace)).get_trace(data)

    base = log_density(masked_orange.values).log_prob_sum()
    changed = masked_orange.values.clone()
    changed[1, 0, 0, 3] = 1e6
    assert log_density(changed).log_prob_sum() == base
    changed[1, 0, 0, 2] += 5.0  # an observed cell does change it
    assert log_density(changed).log_prob_sum() != base


def test_observe_samples_when_values_are_none(orange_data, user_model):
    data = orange_data.without_values()
    trace = poutine.trace(user_model).get_trace(data)
    site = trace.nodes[OBSERVED_SITE]
    assert not site["is_observed"]
    assert site["value"].shape == (5, 1, 1, 7)
    assert (site["value"] > 0).all()
    assert trace.nodes["_RETURN"]["value"] is site["value"]


def test_nlme_model_declares_event_dims_and_coords(soybean_data):
    @nlme_model(event_dims={"effect": ["curve_parameter"]}, coords={"curve_parameter": "ab"})
    def model(data, subsample_size=None):
        return None

    assert model.__name__ == "model"
    assert model_event_dims(model) == {"effect": ("curve_parameter",)}
    assert model_coords(model, soybean_data) == {"curve_parameter": ["a", "b"]}

    @nlme_model(coords=lambda data: {"covariate": data.covariate_names})
    def other(data, subsample_size=None):
        return None

    assert model_event_dims(other) == {}
    assert model_coords(other, soybean_data) == {
        "covariate": ["Variety[P]", "Year[1989]", "Year[1990]"]
    }
    assert model_event_dims(lambda data: None) == {}


@pytest.mark.parametrize("subsample_size", [None, 7])
def test_user_model_traces_with_the_documented_shapes(simulated_data, user_model, subsample_size):
    data = simulated_data
    batch = subsample_size or data.n_varieties
    trace = poutine.trace(user_model).get_trace(data, subsample_size=subsample_size)
    shapes = {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }
    assert shapes == {
        "population_mean": (2,),
        "random_effect_sd": (2,),
        "inflection": (),
        "noise_sd": (),
        "random_effect": (batch, 1, 1, 1, 2),
        CURVE_SITE: (batch, 3, 2, 21),
        OBSERVED_SITE: (batch, 3, 2, 21),
    }
    assert torch.isfinite(trace.log_prob_sum())
    frames = {f.name: f.dim for f in trace.nodes["random_effect"]["cond_indep_stack"]}
    assert frames == {"variety": -4}


def test_user_model_structure(simulated_data, user_model):
    structure = model_structure(user_model, simulated_data)
    assert set(structure.population) == {
        "population_mean",
        "random_effect_sd",
        "inflection",
        "noise_sd",
    }
    assert set(structure.individual) == {"random_effect"}
    assert set(structure.observed) == {OBSERVED_SITE}
    assert set(structure.deterministic) == {CURVE_SITE}


def test_user_model_gradients_are_finite(simulated_data, user_model):
    guide = pyro.infer.autoguide.AutoNormal(
        user_model, init_loc_fn=pyro.infer.autoguide.init_to_median
    )
    loss = pyro.infer.Trace_ELBO().differentiable_loss(user_model, guide, simulated_data, 8)
    loss.backward()
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.isfinite(value.grad).all(), name


def test_the_doc_shows_the_verified_user_model():
    """docs/model_convention.md carries this file's code verbatim (after its docstring)."""
    doc = DOC.read_text()
    source = USER_MODEL.read_text()
    code = source[source.index("from __future__") :]
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert any(code.strip() in block for block in blocks)


def test_masked_cells_outside_the_support_leave_gradients_finite(masked_orange, user_model):
    """A masked cell holding 0 or a negative number (padding, junk) is filled with 1.0 before
    the log-normal scores it: no NaN reaches the gradient."""
    values = masked_orange.values.clone()
    values[1, 0, 0, 3] = -5.0
    data = masked_orange.with_values(values, masked_orange.mask)
    guide = pyro.infer.autoguide.AutoNormal(user_model)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(user_model, guide, data)
    loss.backward()
    assert torch.isfinite(loss)
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.isfinite(value.grad).all(), name


def test_growth_scale_is_the_full_data_scale_in_any_view(orange_data):
    """Priors are located from the data as loaded: a minibatch or a copy without values gives
    the same prior."""
    full = GrowthScale.of(orange_data)
    assert (full.value_max.item(), full.time_start.item(), full.time_span.item()) == (
        214.0,
        118.0,
        1464.0,
    )
    for view in (orange_data.subset([3]), orange_data.without_values()):
        scale = GrowthScale.of(view)
        assert torch.equal(scale.logistic_centre, full.logistic_centre)
        assert torch.equal(scale.logistic_spread, full.logistic_spread)
    torch.testing.assert_close(
        full.logistic_centre, torch.tensor([math.log(214.0), math.log(8.0 / 1464.0), 850.0])
    )
