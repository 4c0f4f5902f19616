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
from workbench.eval.lm_eval_tasks import OPTIONS_FIELD, LmEvalOptions
from workbench.quant.config import GROUP_SIZE, LORA_INIT, SKIP, _bits, _method
from workbench.schema import REQUIRED, Field, Reader, parse_with_lines

GRANULARITIES = ("per_layer", "per_block", "per_type")
OPTIMIZERS = ("levelswitch", "cma")


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
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)  # fitness {task: lm_eval:NAME}: how it loads
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
                "heldout_task": self.heldout_task, "lm_eval": self.lm_eval.to_dict()}


def spec_kind(path: str | Path) -> str:
    """"merge" or "quantization": which search a spec file describes (its `kind`, merge by default)."""
    from workbench.search.spec import SpecError

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), SpecError)
    kind = data.get("kind", "merge") if isinstance(data, dict) else "merge"
    if kind not in ("merge", "quantization"):
        Reader(str(path), lines, SpecError).fail(("kind",), f"expected merge or quantization, got {kind!r}")
    return kind


def load_quant_search_spec(path: str | Path) -> QuantSearchSpec:
    path = Path(path)
    if not path.is_file():
        raise QuantSpecError(f"{path}: search spec not found")
    data, lines = parse_with_lines(path.read_text(), str(path), QuantSpecError)
    return quant_search_spec_from_dict(data, str(path), lines)


def _ranks(ranks: list[int], path: tuple, fail) -> list[int]:
    if len(set(ranks)) != len(ranks) or not all(r >= 0 for r in ranks):
        fail(path, f"expected a list of distinct non-negative integers, got {ranks!r}")
    return list(ranks)


def _targets(targets: list[float], path: tuple, fail) -> list[float]:
    if not all(0 < t <= 32 for t in targets):
        fail(path, f"expected a list of total bits per weight (adapters counted), got {targets!r}")
    return [float(t) for t in targets]


def _fitness(fitness: Any, path: tuple, fail) -> str:
    if isinstance(fitness, dict):
        if set(fitness) != {"task"} or not isinstance(fitness["task"], str):
            fail(path, "expected `kl` or {task: NAME} (the task's search split)")
        return fitness["task"]
    if fitness != "kl":
        fail(path, f"expected `kl` or {{task: NAME}}, got {fitness!r}")
    return fitness


FORMAT = {"bits": Field(object, REQUIRED, check=_bits), "group_size": GROUP_SIZE,
          "method": Field(object, None)}
STAGE = Field(dict, msg="expected {windows: N, keep: K} with positive integers", make=Stage,
              fields={"windows": Field(int, low=1), "keep": Field(int, low=1)})
SPEC = Field(dict, msg="expected a mapping", fields={
    "kind": Field(str, choices=("quantization",), msg="expected `kind: quantization`"),
    "name": Field(str, "quant-search"),
    "model": Field(str, msg="expected a float model directory or home model name"),
    "options": Field(dict, msg="expected {formats: [{bits, group_size, method}], ranks: [0, 8, ...]}", fields={
        "formats": Field(list, nonempty=True, msg="expected a non-empty list of {bits, group_size, method}",
                         item=Field(dict, fields=FORMAT, msg="expected {bits, group_size, method}")),
        "ranks": Field(list, [0], nonempty=True, item=int, check=_ranks,
                       want="a list of distinct non-negative integers")}),
    "lora": Field(dict, {}, msg="expected {alpha, init}", fields={
        "alpha": Field(float, 16, positive=True), "init": LORA_INIT}),
    "skip": SKIP,
    "granularity": Field(str, "per_layer", choices=GRANULARITIES),
    "targets": Field(list, nonempty=True, item=float, check=_targets,
                     want="a list of total bits per weight (adapters counted)"),
    "fitness": Field(object, "kl", check=_fitness),
    "seq_len": Field(int, 128, low=1),
    "stages": Field(list, [Stage(2, 4), Stage(8, 1)], nonempty=True, item=STAGE,
                    msg="expected a list of {windows, keep}"),
    "budget": Field(dict, {}, msg="expected a mapping with generations, max_minutes, offspring", fields={
        "generations": Field(int, 30, low=1), "offspring": Field(int, 16, low=1),
        "max_minutes": Field(float, None, positive=True, msg="expected a positive number of minutes")}),
    "optimizer": Field(str, "levelswitch", choices=OPTIMIZERS),
    "seed": Field(int, 0),
    "heldout_windows": Field(int, 16, low=1),
    "heldout_task": Field(str, "zoo-perplexity", msg="expected a perplexity task name or path"),
    "lm_eval": OPTIONS_FIELD,
})


def quant_search_spec_from_dict(data: Any, source: str = "<spec>", lines: dict | None = None) -> QuantSearchSpec:
    r = Reader(source, lines, QuantSpecError, root="spec")
    s = r.check(data, SPEC)
    formats = []
    for i, f in enumerate(s["options"]["formats"]):
        path = ("options", "formats", i)
        fmt = Format(f["bits"], f["group_size"], _method(f["method"], f["bits"], (*path, "method"), r.fail))
        if fmt in formats:
            r.fail(path, f"{fmt.label} is listed twice")
        formats.append(fmt)
    stages, budget = s["stages"], s["budget"]
    for i in range(1, len(stages)):
        if stages[i].windows <= stages[i - 1].windows or stages[i].keep > stages[i - 1].keep:
            r.fail(("stages", i), "each stage scores more windows than the one before, and keeps no more candidates")
    if stages[-1].keep != 1:
        r.fail(("stages", len(stages) - 1, "keep"), "the last stage keeps 1 (the candidate compared with the parent)")
    if stages[0].keep > budget["offspring"]:
        r.fail(("stages", 0, "keep"), f"keeps {stages[0].keep} of {budget['offspring']} offspring")
    return QuantSearchSpec(
        model=s["model"], formats=formats, ranks=s["options"]["ranks"], targets=s["targets"], name=s["name"],
        lora_alpha=float(s["lora"]["alpha"]), lora_init=s["lora"]["init"], skip=s["skip"],
        granularity=s["granularity"], fitness=s["fitness"], seq_len=s["seq_len"], stages=stages,
        generations=budget["generations"], offspring=budget["offspring"], max_minutes=budget["max_minutes"],
        optimizer=s["optimizer"], seed=s["seed"], heldout_windows=s["heldout_windows"],
        heldout_task=s["heldout_task"], lm_eval=s["lm_eval"].relative_to(source), source=source)
