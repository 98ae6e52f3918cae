"""Checkpoints of a training run: parameters, optimiser and RNG states, step and history,
written atomically so an interrupted run resumes to the same result as an uninterrupted one."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state


def save_checkpoint(path: str | Path, optim: pyro.optim.PyroOptim, **state) -> None:
    """Write the param store, ``optim``'s state, the RNG states and ``state`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "param_store": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        "rng": get_rng_state(),
        **state,
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path, optim: pyro.optim.PyroOptim) -> dict:
    """Restore the param store, ``optim`` and the RNG states; return the rest of the state."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    pyro.get_param_store().set_state(payload.pop("param_store"))
    optim.set_state(payload.pop("optim"))
    set_rng_state(payload.pop("rng"))
    return payload
