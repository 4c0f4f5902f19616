"""Merge methods as pure tensor functions; importing this package fills the registry."""

from . import (  # noqa: F401  (each module registers its methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from .base import METHODS, MergeMethod, MergeParams, ParamSpec, get_method

__all__ = ["METHODS", "MergeMethod", "MergeParams", "ParamSpec", "get_method"]
