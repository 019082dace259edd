"""Naive float64 reference implementations (test oracles) for every method in METHOD.md."""

from .naive import METHODS, RefConfig, random_params, run_reference

__all__ = ["METHODS", "RefConfig", "random_params", "run_reference"]
