"""A neural covariate model: a variety's markers and the scenario -> its genetic contribution to
the curve parameters, through a small network whose weights are point estimates fitted by SVI
inside the generative model (maximum a posteriori under Gaussian weight priors).

For a variety with standardised dosages ``z [M]`` and a scenario ``s``::

    hidden[s] = elu(z @ W1 / sqrt(M) + b1 + E[s])       W1 [M, H], E [S, H]
    output[s] = hidden[s] @ W2                            W2 [H, K]

The first layer reads the int8 dosages through
:meth:`~pyro_nlme.data.GenotypeMatrix.standardized_matmul` (only the minibatch's rows are
converted to float; no float copy of the ``[V, M]`` matrix). ``W1`` is stored unscaled and
divided by ``sqrt(M)`` in the forward pass, so that one Adam step of every weight moves a hidden
unit by about the step times ``sqrt(M)`` rather than ``M``, and a unit-scale ``W1`` gives
unit-variance hidden units. The weights carry Gaussian priors, ``W1 ~ Normal(0, 1)`` (a ridge on
``W1 / sqrt(M)``, as the ridge marker prior) and ``W2[:, k] ~ Normal(0, output_scale[k] /
sqrt(H))`` (so the output has about the SD ``output_scale``), added to the model's log-density
as one ``pyro.factor`` outside the variety plate: they are population-level, not scaled by
subsampling. Without them the maximum would overfit (60,000 weights per hidden unit, a few
hundred varieties). ``b1`` and ``E`` are unpenalised.

The parameters live in Pyro's parameter store under ``{name}.*``: every engine that optimises
``pyro.param`` (SVI) fits them; samplers (NUTS) and SAEM would keep them at their initial value,
so the network is an SVI model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional

from pyro_nlme.data import GenotypeMatrix

MARKER_NETWORK = "marker_network"
"""Default name prefix of the network's parameters and sites."""


@dataclass(frozen=True)
class MarkerNetwork:
    """The network's current weights (tensors from the parameter store).

    :param marker_weight: ``W1`` ``[M, H]``, unscaled (divided by ``sqrt(M)`` when applied).
    :param marker_bias: ``b1`` ``[H]``.
    :param scenario_embedding: ``E`` ``[S, H]``.
    :param output_weight: ``W2`` ``[H, K]``.
    """

    marker_weight: torch.Tensor
    marker_bias: torch.Tensor
    scenario_embedding: torch.Tensor
    output_weight: torch.Tensor

    def __call__(self, markers: GenotypeMatrix) -> torch.Tensor:
        """:param markers: genotypes of a batch of ``B`` varieties.
        :returns: ``[B, S, K]``, the network's output per variety and scenario."""
        n_markers = self.marker_weight.shape[0]
        linear = markers.standardized_matmul(self.marker_weight) / math.sqrt(n_markers)
        hidden = functional.elu((linear + self.marker_bias)[:, None, :] + self.scenario_embedding)
        return hidden @ self.output_weight


def marker_network(
    n_markers: int,
    n_scenarios: int,
    output_scale: torch.Tensor,
    hidden: int = 16,
    init_scale: float = 0.1,
    name: str = MARKER_NETWORK,
) -> MarkerNetwork:
    """Register (first call) or fetch the network's parameters and add their prior to the
    model's log-density (site ``{name}_weight_prior``). Call it outside the variety plate.

    :param output_scale: ``[K]`` prior SD of the output per curve parameter (e.g. the scale
        of the genetic SD prior).
    :param hidden: hidden units ``H``.
    :param init_scale: SD of the initial ``W1`` (the output weights start at 0, so the initial
        output is 0 whatever ``W1``).
    :returns: the network with its current weights.
    """
    n_outputs = output_scale.shape[-1]
    like = {"dtype": output_scale.dtype, "device": output_scale.device}
    network = MarkerNetwork(
        marker_weight=pyro.param(
            f"{name}.marker_layer.weight",
            lambda: init_scale * torch.randn(n_markers, hidden, **like),
        ),
        marker_bias=pyro.param(f"{name}.marker_layer.bias", lambda: torch.zeros(hidden, **like)),
        scenario_embedding=pyro.param(
            f"{name}.scenario_embedding", lambda: torch.zeros(n_scenarios, hidden, **like)
        ),
        output_weight=pyro.param(
            f"{name}.output.weight", lambda: torch.zeros(hidden, n_outputs, **like)
        ),
    )
    log_prior = (
        dist.Normal(0.0, 1.0).log_prob(network.marker_weight).sum()
        + dist.Normal(0.0, output_scale / math.sqrt(hidden)).log_prob(network.output_weight).sum()
    )
    pyro.factor(f"{name}_weight_prior", log_prior)
    return network
