"""The search spec: what an evolutionary merge search evolves, against what, for how long.

::

    name: zoo-ties
    base_model: SmolLM2-135M-Instruct
    models: [zoo-expert-arith, zoo-expert-french]   # the sources (the base is added for base methods)
    merge_method: ties
    evolve:                        # parameter -> bounds; per-model (weight, density) or shared (lambda)
      weight: [0.0, 1.0]
      density: [0.1, 1.0]
    granularity: per_layer         # global | per_layer | N (layers per group)
    split_attention_mlp: true      # attention and MLP evolve apart
    fixed: {normalize: true}       # shared parameters held constant
    objective:
      - {task: zoo-combined, weight: 1.0}          # always the task's `search` split
    report_tasks: [zoo-arith, zoo-french]          # also scored (held-out) in the final report
    grid_baseline: true            # the report also scores a grid over the global parameters (steps of
                                   # 0.1) on the search split, as many evaluations as the search made
    budget: {generations: 12, population: 8, max_evaluations: null, max_minutes: 20}
    dtype: bfloat16                # the sources while searching (default: bfloat16 on a GPU, float32 on the CPU)
    sorted_cache: true             # TIES/Breadcrumbs: keep sorted delta magnitudes (bounded by device memory)
    offload_sources: false         # sources in host RAM, moved to the GPU tensor by tensor
    seed: 0
    racing: false
    sigma0: 0.25                   # CMA-ES step size in the genome's [0, 1] units
    limit: null                    # items per task (null: the whole search split)
    lm_eval: {include_path: [tasks/], seed: 0, search_docs: 200}   # for objective / report tasks named
                                   # lm_eval:NAME (lm-evaluation-harness tasks; see workbench.eval.lm_eval_tasks)
    quantize: recipes/ternary.yml  # joint mode: each candidate scored after quantizing by this config
                                   # (adapters SVD-initialised, no training): the merge that survives
                                   # low-bit deployment best

Validated here, in one place; errors name the file, the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.eval.lm_eval_tasks import OPTIONS_FIELD, LmEvalOptions
from workbench.merge.methods import METHODS
from workbench.merge.recipe import DTYPES
from workbench.schema import Field, Reader, parse_with_lines

# bfloat16 scores a candidate about 1.7x faster than float32 on a CPU with AVX-512 bf16 (and on GPUs);
# per-item log-likelihoods move by about 1e-2, the ranking of candidates hardly at all.
EVAL_DTYPES = ("bfloat16", "float32")
SEARCHABLE = ("ties", "dare_ties", "dare_linear", "task_arithmetic", "linear", "slerp", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear", "sce", "multislerp", "nearswap")


class SpecError(WorkbenchError, ValueError):
    """A search spec that does not validate."""


@dataclass
class Objective:
    task: str
    weight: float = 1.0


@dataclass
class Budget:
    generations: int = 10
    population: int = 8
    max_evaluations: int | None = None
    max_minutes: float | None = None


@dataclass
class SearchSpec:
    models: list[str]
    merge_method: str
    evolve: dict[str, tuple[float, float]]
    objective: list[Objective]
    base_model: str | None = None
    name: str = "search"
    granularity: str | int = "global"
    split_attention_mlp: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    racing: bool = False
    sigma0: float = 0.25
    limit: int | None = None
    dtype: str | None = None        # the sources' dtype while searching (and the recipe's); None: bfloat16 on
                                    # a GPU, float32 on the CPU. Tensors merge in float32 either way.
    eval_dtype: str = "bfloat16"    # the resident model's weights while candidates are scored
    batch_size: int = 32
    report_tasks: list[str] = field(default_factory=list)  # scored on held-out at the end, beside the objective
    grid_baseline: bool = True   # the report's grid over global parameters at the search's cost
    quantize: str | None = None  # a quantization config: each candidate is scored after quantizing (joint mode)
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)  # how lm_eval:NAME tasks load and split
    sorted_cache: bool = True       # keep sorted delta magnitudes (TIES, Breadcrumbs), within the device's memory
    offload_sources: bool = False   # hold the sources in host RAM, each moved to the device as it merges
    source: str = "<spec>"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "base_model": self.base_model, "models": list(self.models),
            "merge_method": self.merge_method, "evolve": {k: list(v) for k, v in self.evolve.items()},
            "granularity": self.granularity, "split_attention_mlp": self.split_attention_mlp,
            "fixed": dict(self.fixed), "objective": [{"task": o.task, "weight": o.weight} for o in self.objective],
            "budget": vars(self.budget).copy(), "seed": self.seed, "racing": self.racing, "sigma0": self.sigma0,
            "limit": self.limit, "dtype": self.dtype, "eval_dtype": self.eval_dtype, "batch_size": self.batch_size,
            "report_tasks": list(self.report_tasks), "grid_baseline": self.grid_baseline, "quantize": self.quantize,
            "lm_eval": self.lm_eval.to_dict(), "sorted_cache": self.sorted_cache,
            "offload_sources": self.offload_sources,
        }


def load_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), SpecError)
    return spec_from_dict(data, source=str(path), lines=lines)


def _granularity(g: str | int, path: tuple, fail) -> str | int:
    if g not in ("global", "per_layer") and not (isinstance(g, int) and g > 0):
        fail(path, f"expected global, per_layer or a positive number of layers per group, got {g!r}")
    return g


def _objective(o: Any, path: tuple, fail) -> Objective:
    o = {"task": o} if isinstance(o, str) else o
    if not isinstance(o, dict) or not isinstance(o.get("task"), str) or set(o) - {"task", "weight", "split"}:
        fail(path, "expected {task: NAME, weight: NUMBER}")
    if o.get("split", "search") != "search":
        fail((*path, "split"), "a search objective uses the task's `search` split; the `heldout` split "
                               "is kept for the report, never searched on")
    w = o.get("weight", 1.0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
        fail((*path, "weight"), f"expected a positive number, got {w!r}")
    return Objective(o["task"], float(w))


BUDGET = {"generations": Field(int, 10, low=1), "population": Field(int, 8, low=2, want="a positive integer >= 2"),
          "max_evaluations": Field(int, None, low=1),
          "max_minutes": Field(float, None, positive=True, msg="expected a positive number of minutes")}
SPEC = Field(dict, msg="expected a mapping", fields={
    "kind": Field(object, "merge"),
    "merge_method": Field(object, None, choices=SEARCHABLE,
                          msg=lambda v: f"{v!r} cannot be searched; expected one of {', '.join(SEARCHABLE)}"),
    "name": Field(str, "search"),
    "base_model": Field(str, None),
    "models": Field(list, nonempty=True, item=str, msg="expected a non-empty list of model names or paths"),
    "evolve": Field(dict, nonempty=True, msg="expected a mapping of parameter -> [low, high]"),
    "granularity": Field((str, int), "global", check=_granularity,
                         want="global, per_layer or a positive number of layers per group"),
    "split_attention_mlp": Field(bool, False),
    "fixed": Field(dict, {}, msg="expected a mapping of shared parameters"),
    "objective": Field(list, nonempty=True, item=Field(object, check=_objective),
                       msg="expected a list of {task, weight}"),
    "budget": Field(dict, {}, make=Budget, fields=BUDGET,
                    msg=f"expected a mapping with {', '.join(sorted(BUDGET))}"),
    "seed": Field(int, 0),
    "racing": Field(bool, False),
    "sigma0": Field(float, 0.25, positive=True, high=1),
    "limit": Field(int, None, low=1),
    "dtype": Field(str, None, choices=DTYPES, want=f"one of {DTYPES}"),
    "eval_dtype": Field(str, "bfloat16", choices=EVAL_DTYPES, want=f"one of {EVAL_DTYPES}"),
    "batch_size": Field(int, 32, low=1),
    "report_tasks": Field(list, [], item=str, msg="expected a list of task names or paths"),
    "grid_baseline": Field(bool, True),
    "quantize": Field(str, None, msg="expected the path of a quantization config (e.g. recipes/ternary.yml)"),
    "lm_eval": OPTIONS_FIELD,
    "sorted_cache": Field(bool, True),
    "offload_sources": Field(bool, False),
})


def spec_from_dict(data: Any, source: str = "<spec>", lines: dict | None = None) -> SearchSpec:
    r = Reader(source, lines, SpecError, root="spec")
    s = r.check(data, SPEC)
    if s["kind"] != "merge":
        r.fail(("kind",), f"expected merge here, got {s['kind']!r} (a quantization spec runs with `workbench "
                          "search`, which reads its kind)")
    method, base, models = s["merge_method"], s["base_model"], s["models"]
    if method not in SEARCHABLE:
        r.fail(("merge_method",), f"{method!r} cannot be searched; expected one of {', '.join(SEARCHABLE)}")
    m = METHODS[method]
    if m.base == "required" and base is None:
        r.fail(("base_model",), f"{method} needs a base_model")
    n_sources = len([x for x in models if x != base])
    if n_sources < m.min_models or (m.max_models is not None and n_sources > m.max_models):
        r.fail(("models",), f"{method} takes {m.min_models}..{m.max_models or 'any'} models besides the base, "
                            f"got {n_sources}")
    bounds = {}
    for name, b in s["evolve"].items():
        spec = m.params.get(name)
        if spec is None or spec.kind is bool:
            r.fail(("evolve", name), f"not a numeric parameter of {method}; it takes {', '.join(sorted(m.params))}")
        if (not isinstance(b, list) or len(b) != 2 or not all(isinstance(v, (int, float)) for v in b)
                or not b[0] < b[1]):
            r.fail(("evolve", name), f"expected [low, high] with low < high, got {b!r}")
        if (spec.low is not None and b[0] < spec.low) or (spec.high is not None and b[1] > spec.high):
            r.fail(("evolve", name), f"bounds {b} leave the parameter's range [{spec.low}, {spec.high}]")
        bounds[name] = (float(b[0]), float(b[1]))
    for name in s["fixed"]:
        if name not in m.params or m.params[name].per_model:
            r.fail(("fixed", name), f"not a shared parameter of {method}")
        if name in bounds:
            r.fail(("fixed", name), "is also evolved")
    missing = [n for n, p in m.params.items() if p.required and n not in bounds and n not in s["fixed"]]
    if missing:
        r.fail(("evolve",), f"{method} needs {', '.join(missing)}: evolve or fix it")
    quantize = s["quantize"]
    if quantize is not None:
        from workbench.quant.config import QuantConfigError, load_quant_config

        path = Path(quantize).expanduser()
        if not path.is_absolute() and source not in ("<spec>",) and not path.is_file():
            path = Path(source).parent / path  # relative to the spec file when not to the working directory
        if not path.is_file():
            r.fail(("quantize",), f"{quantize}: quantization config not found")
        try:
            load_quant_config(path)
        except QuantConfigError as e:
            r.fail(("quantize",), str(e))
        quantize = str(path.resolve())
    del s["kind"]
    return SearchSpec(**{**s, "evolve": bounds, "fixed": dict(s["fixed"]), "lm_eval": s["lm_eval"].relative_to(source),
                         "sigma0": float(s["sigma0"]), "quantize": quantize}, source=source)
