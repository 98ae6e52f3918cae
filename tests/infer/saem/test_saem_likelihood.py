"""Importance-sampling log-likelihood and Louis' standard errors against the exact ones of the
linear-random-effect (Orange) model."""

import pytest
import torch

from pyro_nlme.infer.saem import fisher, mstep
from pyro_nlme.infer.saem.common import conditional_run, make_target, reported
from pyro_nlme.infer.saem.estep import e_step, init_e_step
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme.infer.saem.likelihood import Proposal, importance_sampling
from pyro_nlme.reference import marginal_log_likelihood
from pyro_nlme_models.orange import orange

PARAMETERS = ("asymptote", "inflection", "scale", "asymptote_sd", "noise_sd")


def _conditional(joint, theta, seed=0):
    torch.manual_seed(seed)
    mstep.analyse(joint, theta)
    rows = joint.rows(2)
    state = init_e_step(make_target(joint, theta, rows))
    for _ in range(30):
        state, _ = e_step(state, make_target(joint, theta, rows), "rwm", adapt=True)
    return conditional_run(joint, theta, state, rows, 2, "rwm", 100, 10)


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_importance_sampling_equals_exact(orange_data, orange_exact, shift):
    """At the MLE and one SE away from it, the estimate is within 4 Monte-Carlo SEs."""
    joint = JointModel(orange, orange_data)
    values = {
        k: orange_exact.estimate[k] + shift * orange_exact.standard_error[k] for k in PARAMETERS
    }
    theta = joint.theta_from_values(values)
    posterior = _conditional(joint, theta)
    proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=3)
    estimate = importance_sampling(joint, theta, proposal, 2000)
    exact = float(
        marginal_log_likelihood(torch.tensor([values[k] for k in PARAMETERS]), orange_data)
    )
    assert estimate.mcse < 0.02
    assert abs(estimate.value - exact) < 4 * estimate.mcse


def test_louis_standard_errors_equal_exact(orange_data, orange_exact):
    joint = JointModel(orange, orange_data)
    theta = joint.theta_from_values(orange_exact.estimate)
    posterior = _conditional(joint, theta)
    proposal = Proposal(joint, posterior.mean, posterior.covariance, seed=0)
    likelihood = importance_sampling(joint, theta, proposal, 2048)
    information = fisher.louis_information(joint, theta, proposal, likelihood, 2048)
    natural = fisher.natural_covariance(
        information, reported(joint).fn, theta, torch.arange(joint.theta_dim)
    )
    se = natural.covariance.diagonal().sqrt()
    exact = torch.tensor([orange_exact.standard_error[k] for k in PARAMETERS], dtype=se.dtype)
    torch.testing.assert_close(se, exact, rtol=0.02, atol=0.0)
