"""Resolving a model given on the command line: a built-in name or ``path/to/file.py:function``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

BUILTIN_MODELS = {
    "g2was": "pyro_nlme_models.g2was:g2was",
    "orange": "pyro_nlme_models.orange:orange",
    "soybean": "pyro_nlme_models.soybean:soybean",
}
"""Built-in model names and where their functions live (the repository's ``models/``)."""
DEFAULT_MODEL = "g2was"


def resolve_model(spec: str | None) -> tuple[Callable, str]:
    """The model function named by ``spec`` and the name to record with the fit.

    :param spec: a built-in name (``g2was``, ``orange``, ``soybean``), ``module:function``, or
        ``path/to/file.py:function``; None gives :data:`DEFAULT_MODEL`.
    :raises ValueError: naming the file or function that could not be found.
    """
    spec = spec or DEFAULT_MODEL
    target = BUILTIN_MODELS.get(spec, spec)
    if ":" not in target:
        raise ValueError(
            f"unknown model {spec!r}: use one of {sorted(BUILTIN_MODELS)} "
            "or path/to/file.py:function"
        )
    location, function = target.rsplit(":", 1)
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ValueError(f"model file {str(path)!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    model = getattr(module, function, None)
    if not callable(model):
        raise ValueError(f"{location!r} has no function {function!r}")
    return model, spec


def accepts(model: Callable, keyword: str) -> bool:
    """Whether ``model`` takes the keyword argument ``keyword`` (e.g. ``likelihood``)."""
    parameters = inspect.signature(model).parameters
    return keyword in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
