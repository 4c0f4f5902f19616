"""The quantization search spec: which per-layer formats and adapter ranks, under which budgets.

::

    kind: quantization            # what makes this a quantization search (merge specs: kind: merge, or none)
    name: smollm2-quant
    model: SmolLM2-135M-Instruct  # a float model directory or home model name
    options:                      # every layer (or unit) picks one format and one rank
      formats:
        - {bits: ternary, group_size: 64}          # method: lsq for ternary, hqq for 1-4 bits
        - {bits: 2, group_size: 64}
        - {bits: 4, group_size: 64}
      ranks: [0, 8, 16, 32]
    lora: {alpha: 16, init: svd}  # one alpha for every rank (llama.cpp adapters have one)
    skip: [lm_head]
    granularity: per_layer        # per_layer | per_block (a decoder block's linears together) | per_type (q_proj ...)
    targets: [2.5, 3.0, 4.0]      # total bits per weight of the linear layers, adapters counted
    fitness: kl                   # KL to the float model on the calibration text's search split, or {task: NAME}:
                                  # 1 - the task's score on its search split (stage `windows` then count items)
    seq_len: 128                  # tokens per fitness window
    stages:                       # multi-step selection: every offspring on the first windows, the best on more
      - {windows: 2, keep: 4}
      - {windows: 8, keep: 1}
    budget: {generations: 30, offspring: 16, max_minutes: 20}
    optimizer: levelswitch        # levelswitch (EvoPress-style, 1 + lambda) | cma (pycma, integer genes)
    seed: 0
    heldout_windows: 16           # windows of the held-out text for the front's KL
    heldout_task: zoo-perplexity  # whose heldout split gives the front's perplexity

Validated here in one place; errors name the file, the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.quant.config import _bits, _group, _method
from workbench.yaml_lines import field_location, parse_with_lines

KEYS = {"kind", "name", "model", "options", "lora", "skip", "granularity", "targets", "fitness", "seq_len",
        "stages", "budget", "optimizer", "seed", "heldout_windows", "heldout_task"}
GRANULARITIES = ("per_layer", "per_block", "per_type")
OPTIMIZERS = ("levelswitch", "cma")
BUDGET_KEYS = {"generations", "offspring", "max_minutes"}


class QuantSpecError(WorkbenchError, ValueError):
    """A quantization search spec that does not validate."""


@dataclass(frozen=True)
class Format:
    bits: float  # 1.58 (ternary) or 1..4
    group_size: int
    method: str | None = None

    @property
    def label(self) -> str:
        return f"{'ternary' if self.bits == 1.58 else f'{self.bits}bit'} g{self.group_size}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, **({"method": self.method} if self.method else {})}


@dataclass(frozen=True)
class LayerOption:
    """One choice for a layer: a format and an adapter rank."""
    format: Format
    rank: int

    @property
    def label(self) -> str:
        return f"{self.format.label} r{self.rank}"


@dataclass
class Stage:
    windows: int
    keep: int


@dataclass
class QuantSearchSpec:
    model: str
    formats: list[Format]
    ranks: list[int]
    targets: list[float]
    name: str = "quant-search"
    lora_alpha: float = 16.0
    lora_init: str = "svd"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    granularity: str = "per_layer"
    fitness: str = "kl"  # "kl" or a task name (its search split)
    seq_len: int = 128
    stages: list[Stage] = field(default_factory=lambda: [Stage(2, 4), Stage(8, 1)])
    generations: int = 30
    offspring: int = 16
    max_minutes: float | None = None
    optimizer: str = "levelswitch"
    seed: int = 0
    heldout_windows: int = 16
    heldout_task: str = "zoo-perplexity"  # its heldout split gives the front's perplexity
    source: str = "<spec>"

    @property
    def options(self) -> list[LayerOption]:
        """Every (format, rank), format-major: option index = format index * len(ranks) + rank index."""
        return [LayerOption(f, r) for f in self.formats for r in self.ranks]

    @property
    def windows(self) -> int:
        """Windows of search text the last stage scores on (the first stages use a prefix)."""
        return self.stages[-1].windows

    def to_dict(self) -> dict:
        return {"kind": "quantization", "name": self.name, "model": self.model,
                "options": {"formats": [f.to_dict() for f in self.formats], "ranks": list(self.ranks)},
                "lora": {"alpha": self.lora_alpha, "init": self.lora_init}, "skip": list(self.skip),
                "granularity": self.granularity, "targets": list(self.targets),
                "fitness": self.fitness if self.fitness == "kl" else {"task": self.fitness},
                "seq_len": self.seq_len, "stages": [vars(s).copy() for s in self.stages],
                "budget": {"generations": self.generations, "offspring": self.offspring,
                           "max_minutes": self.max_minutes},
                "optimizer": self.optimizer, "seed": self.seed, "heldout_windows": self.heldout_windows,
                "heldout_task": self.heldout_task}


def spec_kind(path: str | Path) -> str:
    """"merge" or "quantization": which search a spec file describes (its `kind`, merge by default)."""
    from workbench.search.spec import SpecError

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), SpecError)
    kind = data.get("kind", "merge") if isinstance(data, dict) else "merge"
    if kind not in ("merge", "quantization"):
        raise SpecError(f"{field_location(str(path), lines, ('kind',))}: kind: expected merge or quantization, "
                        f"got {kind!r}")
    return kind


def load_quant_search_spec(path: str | Path) -> QuantSearchSpec:
    path = Path(path)
    if not path.is_file():
        raise QuantSpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), QuantSpecError)
    return quant_search_spec_from_dict(data, str(path), lines)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def quant_search_spec_from_dict(data: Any, source: str = "<spec>", lines: dict | None = None) -> QuantSearchSpec:
    lines = lines or {}

    def fail(path: tuple, msg: str):
        raise QuantSpecError(f"{field_location(source, lines, path)}: {'.'.join(map(str, path)) or 'spec'}: {msg}")

    if not isinstance(data, dict):
        fail((), "expected a mapping")
    for key in data:
        if key not in KEYS:
            fail((key,), f"unknown key; expected one of {', '.join(sorted(KEYS))}")
    if data.get("kind") != "quantization":
        fail(("kind",), "expected `kind: quantization`")
    if not isinstance(data.get("model"), str):
        fail(("model",), "expected a float model directory or home model name")
    options = data.get("options")
    if not isinstance(options, dict) or set(options) - {"formats", "ranks"} or "formats" not in options:
        fail(("options",), "expected {formats: [{bits, group_size, method}], ranks: [0, 8, ...]}")
    formats = []
    if not isinstance(options["formats"], list) or not options["formats"]:
        fail(("options", "formats"), "expected a non-empty list of {bits, group_size, method}")
    for i, f in enumerate(options["formats"]):
        if not isinstance(f, dict) or "bits" not in f or set(f) - {"bits", "group_size", "method"}:
            fail(("options", "formats", i), "expected {bits, group_size, method}")
        bits = _bits(f["bits"], ("options", "formats", i, "bits"), fail)
        group = _group(f.get("group_size", 64), ("options", "formats", i, "group_size"), fail)
        method = _method(f.get("method"), bits, ("options", "formats", i, "method"), fail)
        fmt = Format(bits, group, method)
        if fmt in formats:
            fail(("options", "formats", i), f"{fmt.label} is listed twice")
        formats.append(fmt)
    ranks = options.get("ranks", [0])
    if (not isinstance(ranks, list) or not ranks or len(set(ranks)) != len(ranks)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
        fail(("options", "ranks"), f"expected a list of distinct non-negative integers, got {ranks!r}")
    lora = data.get("lora") or {}
    if not isinstance(lora, dict) or set(lora) - {"alpha", "init"}:
        fail(("lora",), "expected {alpha, init}")
    alpha = lora.get("alpha", 16)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        fail(("lora", "alpha"), f"expected a positive number, got {alpha!r}")
    init = lora.get("init", "svd")
    if init not in ("svd", "zeros"):
        fail(("lora", "init"), f"expected 'svd' or 'zeros', got {init!r}")
    skip = data.get("skip", ["lm_head"])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        fail(("skip",), "expected a list of module-name patterns")
    gran = data.get("granularity", "per_layer")
    if gran not in GRANULARITIES:
        fail(("granularity",), f"expected one of {', '.join(GRANULARITIES)}, got {gran!r}")
    targets = data.get("targets")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 32 for t in targets)):
        fail(("targets",), f"expected a list of total bits per weight (adapters counted), got {targets!r}")
    fitness = data.get("fitness", "kl")
    if isinstance(fitness, dict):
        if set(fitness) != {"task"} or not isinstance(fitness["task"], str):
            fail(("fitness",), "expected `kl` or {task: NAME} (the task's search split)")
        fitness = fitness["task"]
    elif fitness != "kl":
        fail(("fitness",), f"expected `kl` or {{task: NAME}}, got {fitness!r}")
    stages = data.get("stages", [{"windows": 2, "keep": 4}, {"windows": 8, "keep": 1}])
    if not isinstance(stages, list) or not stages:
        fail(("stages",), "expected a list of {windows, keep}")
    parsed = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or set(s) != {"windows", "keep"} or not all(map(_positive_int, s.values())):
            fail(("stages", i), "expected {windows: N, keep: K} with positive integers")
        if parsed and (s["windows"] <= parsed[-1].windows or s["keep"] > parsed[-1].keep):
            fail(("stages", i), "each stage scores more windows than the one before, and keeps no more candidates")
        parsed.append(Stage(s["windows"], s["keep"]))
    if parsed[-1].keep != 1:
        fail(("stages", len(parsed) - 1, "keep"), "the last stage keeps 1 (the candidate compared with the parent)")
    budget = data.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - BUDGET_KEYS:
        fail(("budget",), f"expected a mapping with {', '.join(sorted(BUDGET_KEYS))}")
    for key in ("generations", "offspring"):
        if key in budget and not _positive_int(budget[key]):
            fail(("budget", key), f"expected a positive integer, got {budget[key]!r}")
    offspring = budget.get("offspring", 16)
    if parsed[0].keep > offspring:
        fail(("stages", 0, "keep"), f"keeps {parsed[0].keep} of {offspring} offspring")
    minutes = budget.get("max_minutes")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0):
        fail(("budget", "max_minutes"), "expected a positive number of minutes")
    optimizer = data.get("optimizer", "levelswitch")
    if optimizer not in OPTIMIZERS:
        fail(("optimizer",), f"expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    for key in ("seq_len", "heldout_windows"):
        if key in data and not _positive_int(data[key]):
            fail((key,), f"expected a positive integer, got {data[key]!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        fail(("seed",), f"expected an integer, got {seed!r}")
    if not isinstance(data.get("heldout_task", ""), str):
        fail(("heldout_task",), "expected a perplexity task name or path")
    name = data.get("name", "quant-search")
    if not isinstance(name, str):
        fail(("name",), f"expected a string, got {name!r}")
    return QuantSearchSpec(
        model=data["model"], formats=formats, ranks=list(ranks), targets=[float(t) for t in targets], name=name,
        lora_alpha=float(alpha), lora_init=init, skip=list(skip), granularity=gran, fitness=fitness,
        seq_len=data.get("seq_len", 128), stages=parsed, generations=budget.get("generations", 30),
        offspring=offspring, max_minutes=minutes, optimizer=optimizer, seed=seed,
        heldout_windows=data.get("heldout_windows", 16), heldout_task=data.get("heldout_task", "zoo-perplexity"),
        source=source)
