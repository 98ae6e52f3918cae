"""Fixtures of the engine tests."""

from __future__ import annotations

import contextlib

import pytest

from pyro_nlme.infer import svi as svi_module


@pytest.fixture
def killed_after(monkeypatch):
    """``killed_after(n)``: a context in which an SVI run raises ``KeyboardInterrupt`` after
    its ``n``-th step (its progress bar does), as a killed run would stop."""

    @contextlib.contextmanager
    def kill(steps: int):
        class Interrupted(svi_module.tqdm):
            done = 0

            def update(self, n=1):
                super().update(n)
                Interrupted.done += n
                if Interrupted.done == steps:
                    raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(svi_module, "tqdm", Interrupted)
            with pytest.raises(KeyboardInterrupt):
                yield

    return kill
