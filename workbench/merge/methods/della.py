"""DELLA: drop delta entries at random with magnitude-ranked probabilities, with or without TIES."""

from .base import register
from .task_arithmetic import gta_method

REFERENCE = "https://arxiv.org/abs/2406.11617"

register(gta_method(
    "della", sparsifier="della_magprune", consensus="sum", normalize=True, rescale=True, reference=REFERENCE,
))
register(gta_method(
    "della_linear", sparsifier="della_magprune", consensus=None, normalize=False, rescale=True,
    reference=REFERENCE,
))
