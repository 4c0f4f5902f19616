"""Merge methods as pure tensor functions; importing this package fills the registry."""

from . import (  # noqa: F401  (each module registers its methods)
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    nuslerp,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
from .base import METHODS, MergeMethod, MergeParams, ParamSpec, get_method

__all__ = ["METHODS", "MergeMethod", "MergeParams", "ParamSpec", "get_method"]
