"""The M-step: what is detected as closed-form, and the closed form equals the numerical
argmax of the same Monte-Carlo complete-data log-likelihood."""

import numpy as np
import pytest
import scipy.optimize
import torch

from pyro_nlme.infer.saem import mstep
from pyro_nlme.infer.saem.common import make_target, reported
from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme_models.orange import orange
from pyro_nlme_models.soybean import soybean


def _labels(joint, indices):
    names = []
    for b in joint.population:
        names += [b.name] * b.size
    return sorted({names[i] for i in indices.tolist()})


def test_orange_plan(orange_data):
    joint = JointModel(orange, orange_data)
    plan = mstep.analyse(joint, joint.initial_theta())
    assert _labels(joint, plan.closed_form) == ["asymptote", "asymptote_sd", "noise_sd"]
    assert _labels(joint, plan.gradient) == ["inflection", "scale"]
    assert joint.shift is not None
    # a ratio of two derivatives that are equal: 1 to float64 rounding
    torch.testing.assert_close(
        joint.shift.coef, torch.ones_like(joint.shift.coef), rtol=0, atol=1e-12
    )


def test_soybean_plan(soybean_data):
    joint = JointModel(soybean, soybean_data)
    plan = mstep.analyse(joint, joint.initial_theta())
    assert _labels(joint, plan.closed_form) == [
        "covariate_effect",
        "intercept",
        "random_effect_corr",
        "random_effect_sd",
    ]
    assert _labels(joint, plan.gradient) == ["noise_power", "noise_sd"]
    # Covariate effects are centred with the plots' covariate values as coefficients.
    design = joint.data.covariate_design.double()
    coef = joint.shift.coef
    assert torch.allclose(coef[:, 3:].reshape(-1, 3, 3)[:, :, 0], design)


def test_map_takes_the_gradient_path(orange_data):
    joint = JointModel(orange, orange_data)
    plan = mstep.analyse(joint, joint.initial_theta(), map_estimate=True)
    assert plan.closed_form.numel() == 0 and plan.gradient.numel() == joint.theta_dim


def _closed_form_vs_argmax(joint, copies=3, seed=0):
    torch.manual_seed(seed)
    theta0 = joint.initial_theta()
    plan = mstep.analyse(joint, theta0)
    rows = joint.rows(copies)
    state = init_e_step(make_target(joint, theta0, rows))
    for _ in range(20):
        state, _ = e_step(state, make_target(joint, theta0, rows), "rwm", adapt=True)
    u = state.position
    density = joint.log_density(theta0, u, rows)
    stats = mstep.statistics(plan, u, density, rows, copies, joint.n_varieties)
    solved = mstep.solve(joint, plan, stats, theta0, int(joint.data.mask.sum()))
    free = plan.closed_form

    def objective(x, offset=0.0):
        theta = theta0.clone()
        theta[free] = torch.as_tensor(x)
        theta.requires_grad_(True)
        value = -joint.log_density(theta, u, rows).total.sum() / copies - offset
        (grad,) = torch.autograd.grad(value, theta)
        return float(value.detach()), grad[free].numpy()

    # Offset by the value at the closed form, so that the optimiser's relative tolerance
    # applies to the part of Q that the free parameters change.
    offset = objective(solved[free].numpy())[0]

    start = solved[free].numpy() + 0.05 * np.random.default_rng(seed).standard_normal(len(free))
    result = scipy.optimize.minimize(
        objective,
        start,
        args=(offset,),
        jac=True,
        method="BFGS",
        options={"gtol": 1e-9, "maxiter": 10000},
    )
    return 0.0, result, solved, free, reported(joint), theta0


@pytest.mark.parametrize("model_name", ["orange", "soybean"])
def test_closed_form_equals_numerical_argmax(model_name, orange_data, soybean_data):
    model, data = {"orange": (orange, orange_data), "soybean": (soybean, soybean_data)}[model_name]
    joint = JointModel(model, data)
    at_closed_form, numerical, solved, free, report, theta0 = _closed_form_vs_argmax(joint)
    # The closed form is at least as high as the numerical optimum, and they coincide.
    assert at_closed_form <= numerical.fun + 1e-8
    theta = theta0.clone()
    theta[free] = torch.as_tensor(numerical.x)
    np.testing.assert_allclose(
        report.fn(solved).numpy(), report.fn(theta).numpy(), rtol=1e-4, atol=1e-5
    )


def test_g2was_plan_centres_every_scenario_mean():
    """Every scenario mean of g2was (effects form, with markers) is the location of its
    variety x scenario effects, coefficient 1 for every variety. The logistic saturates at
    the random probe points, so some varieties' gradients vanish at one probe and not at the
    other: the detection must judge each probe on its own varieties (it used to reject the
    log rate and inflection means of 40 simulated varieties, which then took the slow
    gradient path)."""
    from pyro_nlme.data import load_data
    from pyro_nlme.simulate import DesignConfig, simulate_design
    from pyro_nlme_models.g2was import g2was

    sim = simulate_design(DesignConfig(n_varieties=40, n_heldout=0, n_markers=300), seed=0)
    data = load_data(sim.phenotypes, markers=sim.genotype_table())
    joint = JointModel(g2was, data, {"marker_form": "effects"})
    plan = mstep.analyse(joint, joint.initial_theta())
    assert _labels(joint, plan.gradient) == ["noise_sd"]
    mean = next(b for b in joint.population if b.name == "scenario_mean")
    assert sorted(joint.shift.theta_index.tolist()) == list(range(mean.offset, mean.offset + 9))
    torch.testing.assert_close(joint.shift.coef, torch.ones_like(joint.shift.coef))
