"""In-memory candidates: one resident model, each candidate's merged tensors written into it.

The source tensors are read once and kept in memory, in the recipe's dtype (the spec's ``dtype``;
when it names none, bfloat16 on a GPU and float32 on the CPU): each tensor's inputs are cast to
float32 as it merges, and the result rounded once into the resident model. ``offload_sources``
keeps them in host RAM, each moved to the device as it merges. A candidate is planned from its recipe,
and only the tensors whose resolved parameters changed since the previous candidate are merged
again and copied into the resident model's parameters. Nothing touches disk per candidate.
A ``BASE+ADAPTER`` source (a LoRA adapter over a base) is held as its merged tensors: each is
read from the base and the adapter's update added when the sources load (``LoraModelDir``), so
it takes the memory of a model of its own and costs nothing per candidate.
For the methods that threshold delta magnitudes (TIES, Breadcrumbs) each delta's magnitudes are
kept sorted after their first use, so a candidate's thresholds are lookups (same tensors), in a
cache bounded by the free memory of the device it lives on (``sorted_cache=False``: none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from workbench.merge.executor import merge_tensor
from workbench.merge.plan import MergePlan, TensorJob, plan_merge
from workbench.merge.recipe import Recipe
from workbench.memory_plan import default_source_dtype, free_bytes, sorted_cache_budget


@dataclass
class MergeStats:
    seconds: float
    tensors_merged: int
    tensors_total: int


def _signature(plan: MergePlan, job: TensorJob) -> tuple:
    """What the merged tensor depends on. Inputs are named by model path: a job's model indices
    point into its own recipe's model list, which differs between recipes (the report merges
    each source alone: every one of them is model 0 of its recipe)."""
    p = job.params

    def ref(r):
        return plan.models[r[0]].source_id, r[1]

    return (plan.method.name, job.base and ref(job.base), tuple(map(ref, job.others)),
            tuple(sorted(p.shared.items())), tuple(tuple(sorted(d.items())) for d in p.per_model))


class InMemoryMerger:
    """Holds the sources and a resident ``transformers`` model; :meth:`apply` merges a recipe into it."""

    def __init__(self, recipe: Recipe, device: str = "cpu", seed: int = 0, model_dtype: str = "float32", *,
                 sorted_cache: bool = True, offload_sources: bool = False):
        """``model_dtype``: the resident model's weights; sources are held in the recipe's dtype
        (default: :func:`default_source_dtype`), tensors merge in its compute dtype (float32, or
        float64) and are cast on the copy in."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.seed = seed
        plan = plan_merge(recipe)
        try:
            ref = plan.models[plan.reference_model]
            self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
            config = AutoConfig.from_pretrained(ref.path)
            with torch.device(self.device):
                self.model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_dtype)).eval()
            self.compute_dtype = plan.compute_dtype()
            self.source_dtype = getattr(torch, recipe.dtype or default_source_dtype(self.device))
            source_device = torch.device("cpu") if offload_sources else self.device
            self._sources: dict[tuple[str, str], torch.Tensor] = {}
            for job in plan.jobs:
                for i, name in ([job.base] if job.base else []) + job.others:
                    key = (plan.models[i].source_id, name)
                    if key not in self._sources:
                        # a copy of its own: a tensor read from a file maps it (and holds a descriptor)
                        self._sources[key] = plan.models[i].get_tensor(name).to(source_device, self.source_dtype,
                                                                               copy=True)
        finally:
            plan.close()
        self._sorted: dict[tuple, torch.Tensor] = {}   # sorted |x - base| per (base, model, tensor)
        self._sorted_bytes = 0
        # measured now that the sources and the model are in place
        self.sorted_cache_bytes = sorted_cache_budget(free_bytes(self.device)) if sorted_cache else 0
        self._targets = dict(self.model.named_parameters(remove_duplicate=False))
        self._targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        self._last: dict[str, tuple] = {}

    def _source(self, key: tuple[str, str]) -> torch.Tensor:
        """A held source on the device in the compute dtype (itself when held so, else a copy)."""
        return self._sources[key].to(self.device, self.compute_dtype)

    def _inputs(self, plan: MergePlan, job: TensorJob):
        def get(ref):
            return self._source((plan.models[ref[0]].source_id, ref[1]))

        return (get(job.base) if job.base else None), [get(r) for r in job.others]

    def _sorted_magnitudes(self, plan: MergePlan, job: TensorJob) -> list[torch.Tensor] | None:
        """Each model's |x - base| sorted, kept across candidates (TIES and Breadcrumbs thresholds
        become lookups: about 1.2 s of a 2 s TIES merge of SmolLM2), within ``sorted_cache_bytes``; in the
        compute dtype, from the sources as held (so bfloat16 sources sort as their float32 values)."""
        if not (plan.method.ranks_magnitudes and job.base):
            return None
        base_key = (plan.models[job.base[0]].source_id, job.base[1])
        keys = [(base_key, plan.models[m].source_id, name) for m, name in job.others]
        missing = [k for k in keys if k not in self._sorted]
        need = sum(self._sources[k[1:]].numel() * self.compute_dtype.itemsize for k in missing)
        if self._sorted_bytes + need > self.sorted_cache_bytes:
            return None
        base = self._source(base_key) if missing else None
        for k in missing:
            mags = (self._source(k[1:]) - base).abs_().view(-1)
            # numpy's vectorized sort is about 12x torch's on CPU here (numpy has no bfloat16)
            numpy_sorts = mags.is_cpu and mags.dtype in (torch.float16, torch.float32, torch.float64)
            self._sorted[k] = torch.from_numpy(np.sort(mags.numpy())) if numpy_sorts else mags.sort().values
        self._sorted_bytes += need
        return [self._sorted[k] for k in keys]

    def apply(self, recipe: Recipe) -> MergeStats:
        """Merge ``recipe`` into the resident model (only the tensors whose parameters changed)."""
        start = time.perf_counter()
        plan = plan_merge(recipe)
        merged = 0
        try:
            with torch.no_grad():
                for job in plan.jobs:
                    sig = _signature(plan, job)
                    if self._last.get(job.out_name) == sig:
                        continue
                    target = self._targets.get(job.out_name)
                    if target is None:
                        raise KeyError(f"the resident model has no tensor {job.out_name}")
                    job.params.sorted_magnitudes = self._sorted_magnitudes(plan, job)
                    out = merge_tensor(plan, job, self._inputs(plan, job), self.device, self.seed)
                    target.copy_(out)
                    self._last[job.out_name] = sig
                    merged += 1
        except BaseException:
            self._last.clear()  # the model is now partly merged: merge everything next time
            raise
        finally:
            plan.close()
        return MergeStats(time.perf_counter() - start, merged, len(plan.jobs))
