"""Model Breadcrumbs: drop each delta's largest outliers and smallest entries, with or without TIES."""

from .base import register
from .task_arithmetic import gta_method

REFERENCE = "https://arxiv.org/abs/2312.06795"

register(gta_method(
    "breadcrumbs", sparsifier="magnitude_outliers", consensus=None, normalize=False, rescale=False,
    reference=REFERENCE,
))
register(gta_method(
    "breadcrumbs_ties", sparsifier="magnitude_outliers", consensus="sum", normalize=False, rescale=False,
    reference=REFERENCE,
))
