"""One E-step sweep: a fixed schedule of kernels (:mod:`.kernels`) moving every chain, with
saemix's adaptation of the proposal scales.

Schedules (steps per iteration):

- ``"rwm"`` (default, saemix's ``nbiter.mcmc = c(2, 2, 2)``): 2 independent proposals from the
  conditional prior, 2 sweeps of componentwise random walk, 2 block random walks;
- ``"mala"``: 2 prior proposals, 4 MALA steps;
- ``"hmc"``: 2 prior proposals, 1 HMC step of 5 leapfrogs;
- ``"dense_mala"``: 2 prior proposals, 4 MALA steps with a dense preconditioner per chain, the
  inverse of the target's local curvature (:func:`~.kernels.curvature_root`), recomputed at the
  chain's position at every E-step while adapting and frozen afterwards (so that the chains of
  the second phase are Markov). For latents whose posterior is strongly correlated, which the
  diagonal kernels cannot cross: nested Gaussian levels whose sum the data determine (g2was's
  variety x scenario and plant effects, measured in ``docs/saem.md``).

The random-walk scales start at the SD of the conditional prior and are adapted towards an
acceptance rate of 0.4 (saemix's ``proba.mcmc``, rate ``stepsize.rw = 0.4``); MALA and HMC step
sizes towards 0.57 and 0.65. Adaptation runs while ``adapt`` is True (the drivers adapt during
the first phase only, so that the chains of the second phase are Markov).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pyro_nlme.infer.saem import kernels
from pyro_nlme.infer.saem.kernels import ChainState, Target

KERNELS = ("rwm", "mala", "hmc", "dense_mala")


@dataclass(frozen=True)
class Schedule:
    """Kernel steps per E-step."""

    prior: int
    componentwise: int
    block: int
    gradient: int


SCHEDULES = {
    "rwm": Schedule(prior=2, componentwise=2, block=2, gradient=0),
    "mala": Schedule(prior=2, componentwise=0, block=0, gradient=4),
    "hmc": Schedule(prior=2, componentwise=0, block=0, gradient=1),
    "dense_mala": Schedule(prior=2, componentwise=0, block=0, gradient=4),
}
TARGET_ACCEPTANCE = {"rwm": 0.4, "mala": 0.57, "hmc": 0.65, "dense_mala": 0.57}
ADAPTATION_RATE = 0.4


class EStepState(NamedTuple):
    """:param position: ``[N, D]`` current latents of every chain.
    :param rw_scale: ``[N, D]`` random-walk proposal SDs.
    :param step_size: ``[N]`` MALA / HMC step sizes (in units of ``preconditioner ** 0.5``).
    :param preconditioner: ``[N, D]`` diagonal preconditioner (squared conditional-prior SDs).
    :param root: ``[N, D, D]`` the dense preconditioner's square root and ``inverse_root`` its
        inverse (``"dense_mala"`` only; None until its first E-step).
    """

    position: torch.Tensor
    rw_scale: torch.Tensor
    step_size: torch.Tensor
    preconditioner: torch.Tensor
    root: torch.Tensor | None = None
    inverse_root: torch.Tensor | None = None


@torch.no_grad()
def init_e_step(target: Target, prior_draws: int = 20) -> EStepState:
    """Chains started from the conditional prior; scales from the prior's SD per component."""
    draws = torch.stack([target.sample_prior() for _ in range(prior_draws)])
    sd = draws.std(0).clamp(min=1e-3)
    n = sd.shape[0]
    step_size = torch.full((n,), 0.5, dtype=sd.dtype)
    return EStepState(draws[0], sd, step_size, sd**2)


def e_step(
    state: EStepState, target: Target, kernel: str, adapt: bool
) -> tuple[EStepState, dict[str, float]]:
    """Run one E-step schedule; returns the new state and mean acceptance rates per kernel."""
    if kernel not in SCHEDULES:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    schedule = SCHEDULES[kernel]
    chain: ChainState = kernels.init(state.position, target)
    rw_scale, step_size = state.rw_scale, state.step_size
    rates: dict[str, list[torch.Tensor]] = {}
    for _ in range(schedule.prior):
        chain, info = kernels.prior_step(chain, target)
        rates.setdefault("prior", []).append(info.acceptance)
    for _ in range(schedule.componentwise):
        chain, info = kernels.componentwise_rw_step(chain, target, rw_scale)
        rates.setdefault("componentwise", []).append(info.acceptance)
        if adapt:
            rw_scale = kernels.adapt_scale(
                rw_scale, info.acceptance, TARGET_ACCEPTANCE["rwm"], ADAPTATION_RATE
            )
    for _ in range(schedule.block):
        chain, info = kernels.block_rw_step(chain, target, rw_scale)
        rates.setdefault("block", []).append(info.acceptance)
        if adapt:
            rw_scale = kernels.adapt_scale(
                rw_scale, info.acceptance[:, None], TARGET_ACCEPTANCE["rwm"], ADAPTATION_RATE
            )
    root, inverse_root = state.root, state.inverse_root
    if kernel == "dense_mala" and (adapt or root is None):
        root, inverse_root = kernels.curvature_root(chain.position, target)
    for _ in range(schedule.gradient):
        if kernel == "mala":
            chain, info = kernels.mala_step(chain, target, step_size, state.preconditioner)
        elif kernel == "dense_mala":
            chain, info = kernels.dense_mala_step(chain, target, step_size, root, inverse_root)
        else:
            chain, info = kernels.hmc_step(chain, target, step_size, state.preconditioner)
        rates.setdefault(kernel, []).append(info.acceptance)
        if adapt:
            step_size = kernels.adapt_scale(
                step_size, info.acceptance, TARGET_ACCEPTANCE[kernel], ADAPTATION_RATE
            )
    summary = {
        name: float(torch.stack([r.mean() for r in rs]).mean()) for name, rs in rates.items()
    }
    new_state = EStepState(
        chain.position.detach(), rw_scale, step_size, state.preconditioner, root, inverse_root
    )
    return new_state, summary
