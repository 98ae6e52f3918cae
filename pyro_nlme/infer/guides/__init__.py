"""Variational families for NLME models (see :func:`build_guide`)."""

from pyro_nlme.infer.guides.amortized import AmortizedGuide, VarietyEncoder
from pyro_nlme.infer.guides.factory import GUIDES, build_guide

__all__ = ["GUIDES", "AmortizedGuide", "VarietyEncoder", "build_guide"]
