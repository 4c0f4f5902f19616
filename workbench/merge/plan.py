"""Turn a validated recipe into a list of tensor jobs, checking the models before any merging.

A :class:`TensorJob` says how one output tensor is made: which method, which input tensor of
which model is the base, which are the others, and the resolved parameter values. Planning
opens every model (headers only), and refuses mismatched architectures, tensor names or
shapes with the full list of mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from workbench.errors import RecipeError
from workbench.merge.methods import MergeMethod, MergeParams
from workbench.merge.recipe import ModelEntry, Recipe, resolve_param
from workbench.models.checkpoint import LAYER_COUNT_KEYS, ModelDir, ModelLoadError, layer_index, rename_layer
from workbench.models.lora import LoraRef, open_model_dir

MAX_LISTED_MISMATCHES = 20
DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclass
class TensorJob:
    out_name: str
    shape: tuple[int, ...]
    base: tuple[int, str] | None  # (model index, tensor name in that model)
    others: list[tuple[int, str]]
    params: MergeParams


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    model_refs: list[str]  # as written in the recipe
    models: list[ModelDir]
    jobs: list[TensorJob]
    num_layers: int
    config: dict  # config.json of the output
    reference_model: int  # index of the model whose config, tokenizer and layout the output follows
    layer_map: list[tuple[int, int]] = field(default_factory=list)  # out layer -> (model, source layer)

    @property
    def tensors(self) -> list[TensorJob]:
        return self.jobs

    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.recipe.dtype == "float64" else torch.float32

    def output_dtype(self, override: str | None = None) -> torch.dtype:
        name = override or self.recipe.out_dtype or self.recipe.dtype
        if name:
            if name not in DTYPE_BY_NAME:
                raise RecipeError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BY_NAME)}")
            return DTYPE_BY_NAME[name]
        ref = self.models[self.reference_model]
        return ref.dtype(ref.tensor_names()[0])

    def model_paths(self) -> dict[str, str]:
        """Each model reference of the recipe -> the absolute path it was read from (``BASE+ADAPTER``
        for a LoRA reference, both parts absolute)."""
        return {ref: m.source_id for ref, m in zip(self.model_refs, self.models)}

    def resolved_recipe(self) -> Recipe:
        """The recipe naming every model by its absolute path: what ``mergekit_config.yml`` holds."""
        return self.recipe.with_model_paths(self.model_paths())

    def close(self) -> None:
        for m in self.models:
            m.close()


def _is_pre_tensor(name: str) -> bool:
    """Embeddings come before the layers; the final norm and head after (matters for slices)."""
    return any(k in name for k in ("embed", "wte", "wpe"))


def plan_merge(recipe: Recipe) -> MergePlan:
    method = recipe.method
    refs = recipe.referenced_models()
    models: list[ModelDir] = []
    for ref, path in zip(refs, recipe.resolve_models(refs)):
        try:
            base_path = path.base if isinstance(path, LoraRef) else path
            if (base_path / "quant_config.json").is_file():
                raise ModelLoadError(f"{base_path} is a compressed (quantized) model; merges read float weights: "
                                     f"`workbench export {base_path} --format hf --out DIR` makes one")
            models.append(open_model_dir(path))   # a BASE+ADAPTER reference: the adapter applied per tensor
        except ModelLoadError as e:
            for m in models:
                m.close()
            field_path = recipe.model_field(ref)
            raise RecipeError(f"{recipe.where(field_path)}: {'.'.join(map(str, field_path))}: "
                              f"model {ref!r}: {e}") from None
    index = {ref: i for i, ref in enumerate(refs)}
    _check_same_architecture(recipe, refs, models)

    if recipe.models is not None:
        base_ref = recipe.base_model if method.base != "none" else None
        entries = list(recipe.models)
        if base_ref is not None and base_ref not in [e.model for e in entries]:
            entries.append(ModelEntry(model=base_ref))
        _check_same_tensors(recipe, [e.model for e in entries], [models[index[e.model]] for e in entries])
        ref_idx = index[base_ref] if base_ref else index[entries[0].model]
        ref_model = models[ref_idx]
        n_layers = ref_model.num_layers
        jobs = []
        for name in ref_model.tensor_names():
            li = layer_index(name)
            t = 0.0 if li is None else (li / (n_layers - 1) if n_layers > 1 else 1.0)
            jobs.append(_job(recipe, method, name, name, ref_model.shape(name), base_ref, entries, index,
                             [recipe.parameters], t, lambda e, n=name: n))
        layer_map = [(ref_idx, i) for i in range(n_layers)]
        config = dict(ref_model.config)
        return MergePlan(recipe, method, refs, models, jobs, n_layers, config, ref_idx, layer_map)

    # slices: output layers are the concatenation of each slice's layer ranges
    jobs, layer_map, out_layer = [], [], 0
    first, last = recipe.slices[0], recipe.slices[-1]
    for si, s in enumerate(recipe.slices):
        base_ref = (s.base_model or recipe.base_model) if method.base != "none" else None
        if base_ref not in [src.model for src in s.sources]:
            base_ref = None
        for src in s.sources:
            n = models[index[src.model]].num_layers
            if src.layer_range[1] > n:
                raise RecipeError(f"{recipe.where(('slices', si))}: layer_range {list(src.layer_range)} of "
                                  f"{src.model!r} goes past its {n} layers")
        ref_src = next((src for src in s.sources if src.model == base_ref), s.sources[0])
        ref_model = models[index[ref_src.model]]
        length = ref_src.layer_range[1] - ref_src.layer_range[0]
        for off in range(length):
            t = off / (length - 1) if length > 1 else 1.0
            src_layer = ref_src.layer_range[0] + off
            names = [n for n in ref_model.tensor_names() if layer_index(n) == src_layer]
            for name in names:
                out_name = rename_layer(name, out_layer)

                def input_name(e: ModelEntry, name=name, off=off) -> str:
                    return rename_layer(name, e.layer_range[0] + off)

                _check_inputs_exist(recipe, si, s.sources, models, index, input_name, ref_model.shape(name))
                jobs.append(_job(recipe, method, out_name, name, ref_model.shape(name), base_ref, s.sources,
                                 index, [s.parameters, recipe.parameters], t, input_name))
            layer_map.append((index[ref_src.model], src_layer))
            out_layer += 1
    # embeddings from the first slice's sources, final norm / head from the last slice's
    for s, pre in ((first, True), (last, False)):
        base_ref = (s.base_model or recipe.base_model) if method.base != "none" else None
        if base_ref not in [src.model for src in s.sources]:
            base_ref = None
        ref_src = next((src for src in s.sources if src.model == base_ref), s.sources[0])
        ref_model = models[index[ref_src.model]]
        for name in ref_model.tensor_names():
            if layer_index(name) is None and _is_pre_tensor(name) == pre:
                _check_inputs_exist(recipe, 0 if pre else len(recipe.slices) - 1, s.sources, models, index,
                                    lambda e, n=name: n, ref_model.shape(name))
                jobs.append(_job(recipe, method, name, name, ref_model.shape(name), base_ref, s.sources, index,
                                 [s.parameters, recipe.parameters], 0.0, lambda e, n=name: n))
    first_base = first.base_model or recipe.base_model
    ref_ref = first_base if first_base in [src.model for src in first.sources] else first.sources[0].model
    ref_idx = index[ref_ref]
    config = _sliced_config(models[ref_idx].config, models[ref_idx].num_layers, layer_map)
    return MergePlan(recipe, method, refs, models, jobs, out_layer, config, ref_idx, layer_map)


def _job(recipe: Recipe, method: MergeMethod, out_name: str, ref_name: str, shape, base_ref: str | None,
         entries: list[ModelEntry], index: dict[str, int], shared_scopes: list[dict], t: float,
         input_name) -> TensorJob:
    """Resolve every parameter of one output tensor at depth ``t``."""
    shared = {name: resolve_param(name, spec, shared_scopes, out_name, t)
              for name, spec in method.shared_params().items()}
    base = None
    others, per_model = [], []
    for e in entries:
        if e.model == base_ref:
            base = (index[e.model], input_name(e))
            continue
        scopes = [e.parameters, *shared_scopes]
        per_model.append({name: resolve_param(name, spec, scopes, input_name(e), t)
                          for name, spec in method.model_params().items()})
        others.append((index[e.model], input_name(e)))
    return TensorJob(out_name, tuple(shape), base, others, MergeParams(shared=shared, per_model=per_model))


def _check_same_architecture(recipe: Recipe, refs: list[str], models: list[ModelDir]) -> None:
    archs = {ref: m.architecture for ref, m in zip(refs, models)}
    if len(set(archs.values())) > 1:
        listing = "; ".join(f"{r}: {a}" for r, a in archs.items())
        raise RecipeError(f"{recipe.source}: models have different architectures ({listing})")


def _check_same_tensors(recipe: Recipe, refs: list[str], models: list[ModelDir]) -> None:
    """Every model must have the reference's tensor names and shapes; list what differs."""
    ref_names = set(models[0].tensor_names())
    problems = []
    for ref, m in zip(refs[1:], models[1:]):
        names = set(m.tensor_names())
        for n in sorted(ref_names - names):
            problems.append(f"{ref}: missing tensor {n}")
        for n in sorted(names - ref_names):
            problems.append(f"{ref}: extra tensor {n} (not in {refs[0]})")
        for n in sorted(ref_names & names):
            if m.shape(n) != models[0].shape(n):
                problems.append(f"{ref}: {n} has shape {list(m.shape(n))}, {refs[0]} has {list(models[0].shape(n))}")
    _raise_mismatches(recipe, problems)


def _check_inputs_exist(recipe: Recipe, slice_index: int, entries: list[ModelEntry], models, index,
                        input_name, shape) -> None:
    problems = []
    for e in entries:
        m, n = models[index[e.model]], input_name(e)
        if n not in m:
            problems.append(f"{e.model}: missing tensor {n}")
        elif m.shape(n) != tuple(shape):
            problems.append(f"{e.model}: {n} has shape {list(m.shape(n))}, expected {list(shape)}")
    _raise_mismatches(recipe, problems, where=recipe.where(("slices", slice_index)))


def _raise_mismatches(recipe: Recipe, problems: list[str], where: str | None = None) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_MISMATCHES]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise RecipeError(f"{where or recipe.source}: the models do not match ({len(problems)} mismatches):\n  "
                      + "\n  ".join(shown) + more)


def _sliced_config(config: dict, source_layers: int, layer_map: list[tuple[int, int]]) -> dict:
    """The reference config with the layer count (and per-layer lists) of the sliced output."""
    config = dict(config)
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = len(layer_map)
    for key, value in list(config.items()):  # e.g. Qwen2's layer_types
        if isinstance(value, list) and len(value) == source_layers and source_layers != len(layer_map):
            config[key] = [value[src] for _, src in layer_map]
    return config
