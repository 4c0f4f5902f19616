"""TIES: trim each delta to its largest magnitudes, elect signs, average the agreeing entries."""

from .base import register
from .task_arithmetic import gta_method

register(gta_method(
    "ties", sparsifier="magnitude", consensus="sum", normalize=True, rescale=False,
    reference="https://arxiv.org/abs/2306.01708",
))
