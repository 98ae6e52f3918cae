"""Exact references that engines are validated against."""

from pyro_nlme.reference.linear_random_asymptote import ExactFit, exact_mle, marginal_log_likelihood

__all__ = ["ExactFit", "exact_mle", "marginal_log_likelihood"]
