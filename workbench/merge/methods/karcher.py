"""Karcher mean: the equally weighted Riemannian (geodesic) mean of the models' directions on the
unit hypersphere, found by fixed-point iteration, scaled by the models' mean norm. A base model,
when the recipe names one, is one of the averaged models (as in mergekit)."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve

PARAMS = {
    "max_iter": ParamSpec(int, 10, help="most fixed-point iterations"),
    "tol": ParamSpec(float, 1e-5, help="norms, angles and steps below this count as zero (stops the iteration)"),
}


def karcher_mean(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    n = len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    valid = [i for i, r in enumerate(norms) if r.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)   # all ~zero (keeps NaN/inf of any input)
    units = [tensors[i] / norms[i] for i in valid]
    alpha = 1 / n
    total = sum([alpha] * len(valid))
    shares = [alpha / total] * len(valid)   # the weights renormalized over the valid models
    mean = torch.zeros_like(units[0])
    for a, u in zip(shares, units):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        # the weighted mean of the log maps of the units at `mean` (tangent vectors of length theta)
        step = torch.zeros_like(mean)
        for a, u in zip(shares, units):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(step)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)   # exponential map
        r = torch.linalg.vector_norm(mean)
        if r.item() > tol:
            mean = mean / r
    return sum(alpha * r for r in norms) * mean


def karcher(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    shared, _ = resolve("karcher", params, PARAMS, len(tensors))
    xs = list(tensors) + ([base] if base is not None else [])
    if not xs:
        raise ValueError("karcher: needs at least one model")
    return karcher_mean(xs, int(shared["max_iter"]), float(shared["tol"]))


register(MergeMethod(
    name="karcher", fn=karcher, params=PARAMS, base="optional", min_models=1,
    reference="https://arxiv.org/abs/2603.04972",
))
