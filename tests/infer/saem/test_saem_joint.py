"""The traced (JIT) E-step density equals the density evaluated under Pyro, at points other than
the one it was traced at, with gradients, and with a per-copy offset as an input.

The traced multivariate-normal term differs from Pyro's by a constant of about 1.7e-7 per row
(measured on Soybean, also at the point of tracing: a normalising constant kept in float32 by
the trace), which no kernel's acceptance ratio nor any M-step sees; values are compared to 1e-6
absolute, gradients to float64 precision."""

import torch

from pyro_nlme.infer.saem import mstep
from pyro_nlme.infer.saem.common import make_target
from pyro_nlme.infer.saem.joint import JointModel
from pyro_nlme_models.soybean import soybean


def test_compiled_density_equals_pyro(soybean_data):
    torch.manual_seed(0)
    joint = JointModel(soybean, soybean_data, jit=True)
    theta = joint.initial_theta()
    mstep.analyse(joint, theta)
    rows = joint.rows(2)
    u = joint.sample_prior(theta, rows)
    compiled = make_target(joint, theta, rows)  # traced here
    moved_theta, moved_u = theta + 0.05, (u + 0.1).requires_grad_(True)
    joint.jit = False
    reference = make_target(joint, moved_theta, rows)
    joint.jit = True
    traced = make_target(joint, moved_theta, rows)
    assert traced.density is not compiled.density
    for got, expected in zip(traced.density(moved_u), reference.density(moved_u), strict=True):
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)
    (g_traced,) = torch.autograd.grad(traced.density(moved_u)[0].sum(), moved_u)
    (g_pyro,) = torch.autograd.grad(reference.density(moved_u)[0].sum(), moved_u)
    torch.testing.assert_close(g_traced, g_pyro, rtol=1e-10, atol=1e-8)

    # An offset of the random effects' Gaussian terms is an input of the traced graph.
    joint.offset_sites = frozenset({"random_effect"})
    joint.offset = torch.zeros(2, joint.n_varieties, joint.z_dim, dtype=joint.dtype)
    make_target(joint, theta, rows)  # traced with the offset
    joint.offset = 0.2 * torch.randn(2, joint.n_varieties, joint.z_dim, dtype=joint.dtype)
    traced = make_target(joint, moved_theta, rows)
    joint.jit = False
    reference = make_target(joint, moved_theta, rows)
    with torch.no_grad():
        for got, expected in zip(traced.density(u), reference.density(u), strict=True):
            torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)
