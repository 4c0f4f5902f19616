"""Genome <-> recipe: the one place where a CMA-ES vector becomes a merge recipe, and back.

A genome is a vector in [0, 1]^n (CMA-ES searches there, with bounds [0, 1]). Each gene is one
value of one evolved parameter:

- per-model parameters (``weight``, ``density``, ...) get a gene per source model, per layer
  group, per part; shared parameters (``lambda``, ``t``) a gene per layer group and part;
- layer groups: ``global`` (1 group), ``per_layer`` (one per layer) or N layers per group;
- parts: with ``split_attention_mlp`` attention tensors (names containing ``attn``) evolve apart
  from the rest (MLP, norms, embeddings); otherwise one part.

A gene ``g`` maps linearly to ``low + g * (high - low)`` of the parameter's bounds. In the recipe,
one group is a scalar; several are a per-layer list (a mergekit gradient with one entry per
layer, which mergekit evaluates at exactly that layer); parts are ``filter`` conditions.
Embeddings and the final norm sit at depth 0 in mergekit's convention, so they take group 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np

from workbench.merge.methods import METHODS
from workbench.merge.recipe import ModelEntry, Recipe, recipe_from_dict
from workbench.search.spec import SearchSpec

ATTENTION_FILTER = "attn"  # matches Llama/Qwen2/Mistral `self_attn` and GPT-2 `attn`


@dataclass(frozen=True)
class Gene:
    param: str
    model: str | None  # None for a shared parameter
    group: int
    part: str  # "all", "attn" or "rest"


class GenomeLayout:
    """The genes of a spec for models with ``num_layers`` layers."""

    def __init__(self, spec: SearchSpec, num_layers: int):
        self.spec = spec
        self.num_layers = num_layers
        g = spec.granularity
        size = num_layers if g == "global" else 1 if g == "per_layer" else int(g)
        self.group_size = max(1, min(size, num_layers))
        self.num_groups = ceil(num_layers / self.group_size)
        self.parts = ["attn", "rest"] if spec.split_attention_mlp else ["all"]
        method = METHODS[spec.merge_method]
        self.sources = [m for m in spec.models if m != spec.base_model] if method.base != "none" else list(spec.models)
        genes = []
        for param in spec.evolve:
            owners = self.sources if method.params[param].per_model else [None]
            for model in owners:
                for group in range(self.num_groups):
                    for part in self.parts:
                        genes.append(Gene(param, model, group, part))
        self.genes = genes

    def __len__(self) -> int:
        return len(self.genes)

    def value(self, gene: Gene, x: float) -> float:
        low, high = self.spec.evolve[gene.param]
        return low + float(np.clip(x, 0.0, 1.0)) * (high - low)

    def gene_of(self, gene: Gene, value: float) -> float:
        low, high = self.spec.evolve[gene.param]
        return (value - low) / (high - low)

    def start(self) -> np.ndarray:
        """The initial mean: the middle of every parameter's bounds."""
        return np.full(len(self), 0.5)

    # --- genome -> recipe ------------------------------------------------------------------
    def setting(self, values: dict[tuple[int, str], float]) -> Any:
        """One parameter's recipe value from its ``{(group, part): value}``."""
        per_part = {}
        for part in self.parts:
            groups = [round(values[(g, part)], 6) for g in range(self.num_groups)]
            if len(set(groups)) == 1:
                per_part[part] = groups[0]
            else:
                per_part[part] = [groups[layer // self.group_size] for layer in range(self.num_layers)]
        if self.parts == ["all"]:
            return per_part["all"]
        return [{"filter": ATTENTION_FILTER, "value": per_part["attn"]}, {"value": per_part["rest"]}]

    def to_recipe(self, x: np.ndarray) -> Recipe:
        spec = self.spec
        collected: dict[tuple[str, str | None], dict] = {}
        for gene, xi in zip(self.genes, x):
            collected.setdefault((gene.param, gene.model), {})[(gene.group, gene.part)] = self.value(gene, xi)
        shared = dict(spec.fixed)
        per_model: dict[str, dict] = {m: {} for m in self.sources}
        for (param, model), values in collected.items():
            (per_model[model] if model is not None else shared)[param] = self.setting(values)
        method = METHODS[spec.merge_method]
        models = [ModelEntry(model=m, parameters=per_model[m]) for m in self.sources]
        if method.base != "none" and spec.merge_method == "slerp":
            models.insert(0, ModelEntry(model=spec.base_model))
        recipe = Recipe(merge_method=spec.merge_method, base_model=spec.base_model if method.base != "none" else None,
                        models=models, parameters=shared, dtype=spec.dtype, name=spec.name)
        return recipe_from_dict(recipe.to_dict(), source=spec.source)  # validated like any recipe

    # --- recipe -> genome ------------------------------------------------------------------
    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe made by :meth:`to_recipe` (or of the same shape)."""
        per_model = {e.model: e.parameters for e in recipe.models or []}
        x = np.empty(len(self))
        for i, gene in enumerate(self.genes):
            scope = recipe.parameters if gene.model is None else per_model.get(gene.model, {})
            setting = scope[gene.param]
            if isinstance(setting, list) and setting and isinstance(setting[0], dict):
                setting = setting[0]["value"] if gene.part == "attn" else setting[-1]["value"]
            value = setting[gene.group * self.group_size] if isinstance(setting, list) else setting
            x[i] = self.gene_of(gene, float(value))
        return x

    def describe(self) -> str:
        return (f"{len(self)} genes: {', '.join(self.spec.evolve)} x {len(self.sources)} model(s) x "
                f"{self.num_groups} layer group(s) x {len(self.parts)} part(s)")
