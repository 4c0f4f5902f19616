"""DARE: drop delta entries at random (keeping ``density``), rescale, then merge with or without TIES."""

from .base import register
from .task_arithmetic import gta_method

REFERENCE = "https://arxiv.org/abs/2311.03099"

register(gta_method(
    "dare_ties", sparsifier="random", consensus="sum", normalize=False, rescale=True, reference=REFERENCE,
))
register(gta_method(
    "dare_linear", sparsifier="random", consensus=None, normalize=False, rescale=True, reference=REFERENCE,
))
