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
    budget: {generations: 12, population: 8, max_evaluations: null, max_minutes: 20}
    seed: 0
    racing: false
    sigma0: 0.25                   # CMA-ES step size in the genome's [0, 1] units
    limit: null                    # items per task (null: the whole search split)
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
from workbench.merge.methods import METHODS
from workbench.merge.recipe import DTYPES

# bfloat16 scores a candidate about 1.7x faster than float32 on a CPU with AVX-512 bf16 (and on GPUs);
# per-item log-likelihoods move by about 1e-2, the ranking of candidates hardly at all.
EVAL_DTYPES = ("bfloat16", "float32")
from workbench.yaml_lines import field_location, parse_with_lines

SEARCHABLE = ("ties", "dare_ties", "dare_linear", "task_arithmetic", "linear", "slerp", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear")
KEYS = {"kind", "name", "base_model", "models", "merge_method", "evolve", "granularity", "split_attention_mlp", "fixed",
        "objective", "budget", "seed", "racing", "sigma0", "limit", "dtype", "eval_dtype", "batch_size", "report_tasks",
        "quantize"}
BUDGET_KEYS = {"generations", "population", "max_evaluations", "max_minutes"}


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
    dtype: str = "float32"          # the recipe's merge dtype
    eval_dtype: str = "bfloat16"    # the resident model's weights while candidates are scored
    batch_size: int = 32
    report_tasks: list[str] = field(default_factory=list)  # scored on held-out at the end, beside the objective
    quantize: str | None = None  # a quantization config: each candidate is scored after quantizing (joint mode)
    source: str = "<spec>"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "base_model": self.base_model, "models": list(self.models),
            "merge_method": self.merge_method, "evolve": {k: list(v) for k, v in self.evolve.items()},
            "granularity": self.granularity, "split_attention_mlp": self.split_attention_mlp,
            "fixed": dict(self.fixed), "objective": [{"task": o.task, "weight": o.weight} for o in self.objective],
            "budget": vars(self.budget).copy(), "seed": self.seed, "racing": self.racing, "sigma0": self.sigma0,
            "limit": self.limit, "dtype": self.dtype, "eval_dtype": self.eval_dtype, "batch_size": self.batch_size,
            "report_tasks": list(self.report_tasks), "quantize": self.quantize,
        }


def load_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), SpecError)
    return spec_from_dict(data, source=str(path), lines=lines)


def spec_from_dict(data: Any, source: str = "<spec>", lines: dict | None = None) -> SearchSpec:
    lines = lines or {}

    def fail(path: tuple, msg: str):
        raise SpecError(f"{field_location(source, lines, path)}: {'.'.join(map(str, path)) or 'spec'}: {msg}")

    if not isinstance(data, dict):
        fail((), "expected a mapping")
    for key in data:
        if key not in KEYS:
            fail((key,), f"unknown key; expected one of {', '.join(sorted(KEYS))}")
    if data.get("kind", "merge") != "merge":
        fail(("kind",), f"expected merge here, got {data.get('kind')!r} (a quantization spec runs with `workbench "
                        "search`, which reads its kind)")
    method = data.get("merge_method")
    if method not in SEARCHABLE:
        fail(("merge_method",), f"{method!r} cannot be searched; expected one of {', '.join(SEARCHABLE)}")
    m = METHODS[method]
    models = data.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(x, str) for x in models):
        fail(("models",), "expected a non-empty list of model names or paths")
    base = data.get("base_model")
    if m.base == "required" and not isinstance(base, str):
        fail(("base_model",), f"{method} needs a base_model")
    n_sources = len([x for x in models if x != base])
    if n_sources < m.min_models or (m.max_models is not None and n_sources > m.max_models):
        fail(("models",), f"{method} takes {m.min_models}..{m.max_models or 'any'} models besides the base, got {n_sources}")

    evolve = data.get("evolve")
    if not isinstance(evolve, dict) or not evolve:
        fail(("evolve",), "expected a mapping of parameter -> [low, high]")
    bounds = {}
    for name, b in evolve.items():
        spec = m.params.get(name)
        if spec is None or spec.kind is bool:
            fail(("evolve", name), f"not a numeric parameter of {method}; it takes {', '.join(sorted(m.params))}")
        if (not isinstance(b, list) or len(b) != 2 or not all(isinstance(v, (int, float)) for v in b)
                or not b[0] < b[1]):
            fail(("evolve", name), f"expected [low, high] with low < high, got {b!r}")
        if (spec.low is not None and b[0] < spec.low) or (spec.high is not None and b[1] > spec.high):
            fail(("evolve", name), f"bounds {b} leave the parameter's range [{spec.low}, {spec.high}]")
        bounds[name] = (float(b[0]), float(b[1]))
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail(("fixed",), "expected a mapping of shared parameters")
    for name, value in fixed.items():
        if name not in m.params or m.params[name].per_model:
            fail(("fixed", name), f"not a shared parameter of {method}")
        if name in bounds:
            fail(("fixed", name), "is also evolved")
    missing = [n for n, s in m.params.items() if s.required and n not in bounds and n not in fixed]
    if missing:
        fail(("evolve",), f"{method} needs {', '.join(missing)}: evolve or fix it")

    gran = data.get("granularity", "global")
    if not (gran in ("global", "per_layer") or (isinstance(gran, int) and not isinstance(gran, bool) and gran > 0)):
        fail(("granularity",), f"expected global, per_layer or a positive number of layers per group, got {gran!r}")

    objective = data.get("objective")
    if not isinstance(objective, list) or not objective:
        fail(("objective",), "expected a list of {task, weight}")
    objs = []
    for i, o in enumerate(objective):
        if isinstance(o, str):
            o = {"task": o}
        if not isinstance(o, dict) or not isinstance(o.get("task"), str) or set(o) - {"task", "weight", "split"}:
            fail(("objective", i), "expected {task: NAME, weight: NUMBER}")
        if o.get("split", "search") != "search":
            fail(("objective", i, "split"), "a search objective uses the task's `search` split; the `heldout` split "
                                            "is kept for the report, never searched on")
        w = o.get("weight", 1.0)
        if not isinstance(w, (int, float)) or w <= 0:
            fail(("objective", i, "weight"), f"expected a positive number, got {w!r}")
        objs.append(Objective(o["task"], float(w)))

    budget = data.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - BUDGET_KEYS:
        fail(("budget",), f"expected a mapping with {', '.join(sorted(BUDGET_KEYS))}")
    for key in ("generations", "population", "max_evaluations"):
        v = budget.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (2 if key == "population" else 1)):
            fail(("budget", key), f"expected a positive integer{' >= 2' if key == 'population' else ''}, got {v!r}")
    if budget.get("max_minutes") is not None and not (isinstance(budget["max_minutes"], (int, float))
                                                      and budget["max_minutes"] > 0):
        fail(("budget", "max_minutes"), "expected a positive number of minutes")

    def typed(key, kind, default, check=lambda v: True, want=""):
        v = data.get(key, default)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool) and kind is not bool or not check(v)):
            fail((key,), f"expected {want or kind.__name__}, got {v!r}")
        return v

    report_tasks = data.get("report_tasks") or []
    if not isinstance(report_tasks, list) or not all(isinstance(t, str) for t in report_tasks):
        fail(("report_tasks",), "expected a list of task names or paths")
    quantize = data.get("quantize")
    if quantize is not None:
        from workbench.quant.config import QuantConfigError, load_quant_config

        if not isinstance(quantize, str):
            fail(("quantize",), "expected the path of a quantization config (e.g. recipes/ternary.yml)")
        path = Path(quantize).expanduser()
        if not path.is_absolute() and source not in ("<spec>",) and not path.is_file():
            path = Path(source).parent / path  # relative to the spec file when not to the working directory
        if not path.is_file():
            fail(("quantize",), f"{quantize}: quantization config not found")
        try:
            load_quant_config(path)
        except QuantConfigError as e:
            fail(("quantize",), str(e))
        quantize = str(path.resolve())
    spec = SearchSpec(
        models=models, merge_method=method, evolve=bounds, objective=objs, base_model=base,
        name=typed("name", str, "search"), granularity=gran,
        split_attention_mlp=typed("split_attention_mlp", bool, False), fixed=dict(fixed),
        budget=Budget(**{k: budget[k] for k in budget}),
        seed=typed("seed", int, 0), racing=typed("racing", bool, False),
        sigma0=float(typed("sigma0", (int, float), 0.25, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        limit=typed("limit", int, None, lambda v: v > 0, "a positive integer"),
        dtype=typed("dtype", str, "float32", lambda v: v in DTYPES, f"one of {DTYPES}"),
        eval_dtype=typed("eval_dtype", str, "bfloat16", lambda v: v in EVAL_DTYPES, f"one of {EVAL_DTYPES}"),
        batch_size=typed("batch_size", int, 32, lambda v: v > 0, "a positive integer"),
        report_tasks=report_tasks, quantize=quantize, source=source,
    )
    return spec
