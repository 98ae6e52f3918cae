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
    """Restore the parameters, ``optim`` and the RNG states; return the rest of the state.

    The parameters must exist already (the guide has run once): their values are copied in
    place, so modules and optimisers that hold them see the restored values.

    :raises ValueError: if the checkpoint's parameters are not those of the current guide.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = payload.pop("param_store")["params"]
    current = dict(pyro.get_param_store().named_parameters())
    if set(saved) != set(current):
        raise ValueError(
            f"checkpoint {str(path)!r} holds other parameters than this model and guide: "
            f"missing {sorted(set(current) - set(saved))[:5]}, "
            f"unknown {sorted(set(saved) - set(current))[:5]}"
        )
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)
    optim.set_state(payload.pop("optim"))
    set_rng_state(payload.pop("rng"))
    return payload
