"""The search builders' forms as plain data: form -> spec dict -> the spec checker, and spec -> form.

A form holds what its widgets hold (text as typed, ticks, lists); :func:`merge_form_dict` turns it
into the dict a spec YAML holds (numbers parsed where they parse; anything else is passed on as
typed, so the spec checker names it), and :func:`check_merge_form` runs the checker
(``spec_from_dict``) and says which field its one-line error names. Opening a spec goes the other
way (:func:`merge_form_from_spec`), and ``spec_from_dict(merge_form_dict(merge_form_from_spec(s)))``
equals ``s``. The same for the quantization search spec (``kind: quantization``). No widget here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import WorkbenchError

SOURCE = "<builder>"  # the spec checker's file name for a form (its errors start with it)


# --- shared helpers ----------------------------------------------------------------------------

def number(text: str) -> Any:
    """An int or float from a field's text; None when blank; the text itself when it is no number."""
    s = text.strip()
    if not s:
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def scalar(text: str) -> Any:
    """A YAML scalar (true, 0.5, 3) from a field's text; None when blank."""
    s = text.strip()
    if not s:
        return None
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def show(value: Any) -> str:
    """A value as a field's text: the inverse of :func:`number` / :func:`scalar`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def error_path(message: str, source: str = SOURCE) -> tuple[str, ...] | None:
    """The field path of a spec checker's ``source[:line]: a.b.0: problem`` line, as strings."""
    if not message.startswith(source):
        return None
    rest = message[len(source):]
    if rest.startswith(":") and rest[1:].split(":", 1)[0].isdigit():  # a line number
        rest = ":" + rest[1:].split(":", 1)[1]
    if not rest.startswith(": "):
        return None
    path = rest[2:].split(": ", 1)[0]
    return tuple(path.split(".")) if path and " " not in path else None


def problem_text(message: str, source: str = SOURCE) -> str:
    """The checker's line without the form's source name (the field path and the problem)."""
    return message[len(source) + 2:] if message.startswith(source + ": ") else message


@dataclass
class FieldError:
    field: str  # the form field the error is shown at ("spec" when none fits)
    text: str


def task_problem(ref: str) -> str | None:
    """Why a built-in task name or task file does not resolve (lm_eval:NAME is left to the checker)."""
    from workbench.eval.lm_eval_tasks import is_lm_eval
    from workbench.eval.taskfile import resolve_task_path

    if is_lm_eval(ref):
        return None

    try:
        resolve_task_path(ref)
    except WorkbenchError as e:
        return str(e)
    return None


def model_problem(ref: str) -> str | None:
    """Why a model name or path does not resolve to a model the workbench reads."""
    from workbench.ops.models import resolve

    try:
        resolve(ref)
    except WorkbenchError as e:
        return str(e)
    except OSError as e:
        return f"{ref}: {e}"
    return None


def save_spec(data: dict, path: str | Path) -> Path:
    """Write a spec dict as YAML (atomically; the caller asked before replacing a file)."""
    from workbench.atomic import atomic_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write("# Written by the workbench search builder (workbench tui).\n")
        f.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
    return path.absolute()


# --- the merge search spec ---------------------------------------------------------------------

@dataclass
class ParamRow:
    """One parameter of the method: evolved within [low, high], or (shared ones) held at ``fixed``."""
    name: str
    evolve: bool = False
    low: str = ""
    high: str = ""
    fixed: str = ""


@dataclass
class ObjectiveRow:
    task: str = ""
    weight: str = "1.0"


@dataclass
class LmEvalFields:
    """How lm_eval:NAME tasks load and split (a spec's `lm_eval:` mapping), in both forms."""
    lm_eval_include_path: str = ""   # comma-separated directories of lm-eval task YAMLs
    lm_eval_seed: str = "0"
    lm_eval_search_docs: str = ""
    lm_eval_heldout_docs: str = ""
    lm_eval_num_fewshot: str = ""
    lm_eval_chat_template: bool = False


@dataclass
class MergeForm(LmEvalFields):
    name: str = "my-search"
    base_model: str = ""  # blank: none
    models: list[str] = field(default_factory=list)
    merge_method: str = "ties"
    params: list[ParamRow] = field(default_factory=list)
    granularity: str = "global"
    split_attention_mlp: bool = False
    objective: list[ObjectiveRow] = field(default_factory=lambda: [ObjectiveRow()])
    report_tasks: str = ""
    generations: str = "10"
    population: str = "8"
    max_evaluations: str = ""
    max_minutes: str = ""
    seed: str = "0"
    limit: str = ""
    racing: bool = False
    sigma0: str = "0.25"
    dtype: str = ""   # "": the device's default (bfloat16 on a GPU, float32 on the CPU)
    eval_dtype: str = "bfloat16"
    batch_size: str = "32"
    quantize: str = ""
    grid_baseline: bool = True


LM_EVAL_KEYS = ("include_path", "seed", "search_docs", "heldout_docs", "num_fewshot", "chat_template")


def lm_eval_dict(form) -> dict | None:
    """The spec's ``lm_eval:`` mapping from a form's lm_eval_* fields (None when all are defaults)."""
    data = {"include_path": split_list(form.lm_eval_include_path), "seed": number(form.lm_eval_seed),
            "search_docs": number(form.lm_eval_search_docs), "heldout_docs": number(form.lm_eval_heldout_docs),
            "num_fewshot": number(form.lm_eval_num_fewshot), "chat_template": form.lm_eval_chat_template}
    defaults = {"include_path": [], "seed": 0, "chat_template": False}
    data = {k: v for k, v in data.items() if v is not None and not (k in defaults and v == defaults[k]
                                                                     and type(v) is type(defaults[k]))}
    return data or None


def lm_eval_fields(options) -> dict:
    """The form's lm_eval_* fields showing a spec's :class:`LmEvalOptions`."""
    return {"lm_eval_include_path": ", ".join(options.include_path), "lm_eval_seed": show(options.seed),
            "lm_eval_search_docs": show(options.search_docs), "lm_eval_heldout_docs": show(options.heldout_docs),
            "lm_eval_num_fewshot": show(options.num_fewshot), "lm_eval_chat_template": options.chat_template}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shared: bool  # False: per model (weight, density)
    kind: str     # "float", "int" or "bool"
    low: float | None
    high: float | None
    default: Any
    help: str


def method_params(method: str) -> list[ParamInfo]:
    """The parameters of a merge method, as the builder lists them (per-model ones first)."""
    from workbench.merge.methods import METHODS

    m = METHODS.get(method)
    if m is None:
        return []
    rows = [ParamInfo(n, not p.per_model, p.kind.__name__, p.low, p.high, p.default, p.help)
            for n, p in m.params.items()]
    return sorted(rows, key=lambda r: r.shared)


def default_params(method: str) -> list[ParamRow]:
    """Rows for a method: weight and density evolved over their usual ranges, the rest untouched."""
    usual = {"weight": ("0.0", "1.0"), "density": ("0.1", "1.0"), "t": ("0.0", "1.0")}
    rows = []
    for p in method_params(method):
        low, high = usual.get(p.name, ("", ""))
        rows.append(ParamRow(p.name, evolve=p.name in usual and p.kind != "bool", low=low, high=high))
    return rows


def searchable_methods() -> tuple[str, ...]:
    from workbench.search.spec import SEARCHABLE

    return SEARCHABLE


def merge_form_dict(form: MergeForm) -> dict:
    """The spec dict of a form (what the YAML file holds); blank optional fields are left out."""
    gran = form.granularity.strip()
    budget = {k: number(getattr(form, k)) for k in ("generations", "population", "max_evaluations", "max_minutes")}
    data: dict[str, Any] = {
        "name": form.name.strip(),
        "base_model": form.base_model.strip() or None,
        "models": list(form.models),
        "merge_method": form.merge_method,
        "evolve": {r.name: [number(r.low), number(r.high)] for r in form.params if r.evolve},
        "granularity": number(gran) if gran.lstrip("-").isdigit() else gran,
        "split_attention_mlp": form.split_attention_mlp,
        "fixed": {r.name: scalar(r.fixed) for r in form.params if not r.evolve and r.fixed.strip()},
        "objective": [{"task": o.task.strip(), "weight": number(o.weight) if o.weight.strip() else 1.0}
                      for o in form.objective],
        "report_tasks": split_list(form.report_tasks),
        "budget": {k: v for k, v in budget.items() if v is not None},
        "seed": number(form.seed),
        "racing": form.racing,
        "sigma0": number(form.sigma0),
        "limit": number(form.limit),
        "dtype": form.dtype or None,
        "eval_dtype": form.eval_dtype,
        "batch_size": number(form.batch_size),
        "quantize": form.quantize.strip() or None,
        "grid_baseline": form.grid_baseline,
        "lm_eval": lm_eval_dict(form),
    }
    return {k: v for k, v in data.items() if v is not None}


def merge_form_from_spec(spec) -> MergeForm:
    """The form showing a loaded :class:`workbench.search.spec.SearchSpec`."""
    rows = {r.name: r for r in default_params(spec.merge_method)}
    for r in rows.values():
        r.evolve, r.low, r.high, r.fixed = False, "", "", ""
    for name, (low, high) in spec.evolve.items():
        rows.setdefault(name, ParamRow(name))
        rows[name].evolve, rows[name].low, rows[name].high = True, show(low), show(high)
    for name, value in spec.fixed.items():
        rows.setdefault(name, ParamRow(name)).fixed = show(value)
    b = spec.budget
    return MergeForm(
        name=spec.name, base_model=spec.base_model or "", models=list(spec.models), merge_method=spec.merge_method,
        params=list(rows.values()), granularity=show(spec.granularity), split_attention_mlp=spec.split_attention_mlp,
        objective=[ObjectiveRow(o.task, show(o.weight)) for o in spec.objective],
        report_tasks=", ".join(spec.report_tasks), generations=show(b.generations), population=show(b.population),
        max_evaluations=show(b.max_evaluations), max_minutes=show(b.max_minutes), seed=show(spec.seed),
        limit=show(spec.limit), racing=spec.racing, sigma0=show(spec.sigma0), dtype=spec.dtype or "",
        eval_dtype=spec.eval_dtype, batch_size=show(spec.batch_size), quantize=spec.quantize or "",
        grid_baseline=spec.grid_baseline, **lm_eval_fields(spec.lm_eval))


MERGE_FIELDS = ("name", "base_model", "models", "merge_method", "granularity", "split_attention_mlp",
                "report_tasks", "seed", "limit", "racing", "sigma0", "dtype", "eval_dtype", "batch_size",
                "quantize", "grid_baseline")


def merge_error_field(path: tuple[str, ...] | None, form: MergeForm) -> str:
    """The form field a checker error path names: ``evolve.weight`` (its row), ``objective.1``,
    ``generations``..., else ``spec``."""
    if not path:
        return "spec"
    head = path[0]
    names = {r.name for r in form.params}
    if head in ("evolve", "fixed"):
        return f"evolve.{path[1]}" if len(path) > 1 and path[1] in names else "evolve"
    if head == "objective":
        return f"objective.{path[1]}" if len(path) > 1 and path[1].isdigit() else "objective"
    if head == "budget":
        return path[1] if len(path) > 1 else "generations"
    if head == "lm_eval":
        return f"lm_eval_{path[1]}" if len(path) > 1 and path[1] in LM_EVAL_KEYS else "lm_eval_include_path"
    return head if head in MERGE_FIELDS else "spec"


def check_merge_form(form: MergeForm, check_files: bool = True):
    """(the checked SearchSpec or None, the first FieldError or None). ``check_files`` also checks
    that every model and task resolves (the checker leaves that to the search's start)."""
    from workbench.search.spec import spec_from_dict

    try:
        spec = spec_from_dict(merge_form_dict(form), source=SOURCE)
    except WorkbenchError as e:
        return None, FieldError(merge_error_field(error_path(str(e)), form), problem_text(str(e)))
    if check_files:
        for key, refs in (("base_model", [spec.base_model] if spec.base_model else []), ("models", spec.models)):
            for ref in refs:
                if (why := model_problem(ref)) is not None:
                    return None, FieldError(key, why)
        for i, o in enumerate(spec.objective):
            if (why := task_problem(o.task)) is not None:
                return None, FieldError(f"objective.{i}", why)
        for t in spec.report_tasks:
            if (why := task_problem(t)) is not None:
                return None, FieldError("report_tasks", why)
    return spec, None


# --- the quantization search spec -------------------------------------------------------------

@dataclass
class QuantForm(LmEvalFields):
    name: str = "my-quant-search"
    model: str = ""
    formats: str = "ternary/64, 2/64, 4/64"  # bits/group_size[/method], comma-separated
    ranks: str = "0, 8, 16"
    lora_alpha: str = "16.0"
    lora_init: str = "svd"
    skip: str = "lm_head"
    granularity: str = "per_block"
    targets: str = "2.5, 3.0"
    fitness: str = "kl"  # kl, or a task name or file (its search split)
    seq_len: str = "128"
    stages: str = "2:4, 8:1"  # windows:keep, comma-separated
    generations: str = "30"
    offspring: str = "16"
    max_minutes: str = ""
    optimizer: str = "levelswitch"
    seed: str = "0"
    heldout_windows: str = "16"
    heldout_task: str = "zoo-perplexity"


def _format_dict(text: str) -> Any:
    parts = [p.strip() for p in text.split("/")]
    if not 2 <= len(parts) <= 3:
        return text  # the checker says what a format is
    out = {"bits": parts[0] if parts[0] == "ternary" else number(parts[0]), "group_size": number(parts[1])}
    if len(parts) == 3 and parts[2]:
        out["method"] = parts[2]
    return out


def _stage_dict(text: str) -> Any:
    parts = [p.strip() for p in text.split(":")]
    return {"windows": number(parts[0]), "keep": number(parts[1])} if len(parts) == 2 else text


def quant_form_dict(form: QuantForm) -> dict:
    fitness = form.fitness.strip() or "kl"
    budget = {"generations": number(form.generations), "offspring": number(form.offspring),
              "max_minutes": number(form.max_minutes)}
    data: dict[str, Any] = {
        "kind": "quantization", "name": form.name.strip(), "model": form.model.strip(),
        "options": {"formats": [_format_dict(f) for f in split_list(form.formats)],
                    "ranks": [number(r) for r in split_list(form.ranks)]},
        "lora": {"alpha": number(form.lora_alpha), "init": form.lora_init},
        "skip": split_list(form.skip),
        "granularity": form.granularity,
        "targets": [number(t) for t in split_list(form.targets)],
        "fitness": fitness if fitness == "kl" else {"task": fitness},
        "seq_len": number(form.seq_len),
        "stages": [_stage_dict(s) for s in split_list(form.stages)],
        "budget": {k: v for k, v in budget.items() if v is not None},
        "optimizer": form.optimizer,
        "seed": number(form.seed),
        "heldout_windows": number(form.heldout_windows),
        "heldout_task": form.heldout_task.strip(),
    }
    if (lm_eval := lm_eval_dict(form)) is not None:
        data["lm_eval"] = lm_eval
    if data["lora"]["alpha"] is None:
        del data["lora"]["alpha"]
    return data


def quant_form_from_spec(spec) -> QuantForm:
    """The form showing a loaded :class:`workbench.quant.search.spec.QuantSearchSpec`."""
    def fmt(f) -> str:
        bits = "ternary" if f.bits == 1.58 else show(f.bits)
        return f"{bits}/{f.group_size}" + (f"/{f.method}" if f.method else "")

    return QuantForm(
        name=spec.name, model=spec.model, formats=", ".join(fmt(f) for f in spec.formats),
        ranks=", ".join(map(str, spec.ranks)), lora_alpha=show(spec.lora_alpha), lora_init=spec.lora_init,
        skip=", ".join(spec.skip), granularity=spec.granularity, targets=", ".join(map(show, spec.targets)),
        fitness=spec.fitness, seq_len=show(spec.seq_len),
        stages=", ".join(f"{s.windows}:{s.keep}" for s in spec.stages), generations=show(spec.generations),
        offspring=show(spec.offspring), max_minutes=show(spec.max_minutes), optimizer=spec.optimizer,
        seed=show(spec.seed), heldout_windows=show(spec.heldout_windows), heldout_task=spec.heldout_task,
        **lm_eval_fields(spec.lm_eval))


QUANT_PATHS = {("options", "formats"): "formats", ("options", "ranks"): "ranks", ("options",): "formats",
               ("lora", "alpha"): "lora_alpha", ("lora", "init"): "lora_init", ("lora",): "lora_alpha",
               ("budget", "generations"): "generations", ("budget", "offspring"): "offspring",
               ("budget", "max_minutes"): "max_minutes", ("budget",): "generations"}
QUANT_FIELDS = ("name", "model", "skip", "granularity", "targets", "fitness", "seq_len", "stages", "optimizer",
                "seed", "heldout_windows", "heldout_task")


def quant_error_field(path: tuple[str, ...] | None) -> str:
    if not path:
        return "spec"
    for n in (2, 1):
        if path[:n] in QUANT_PATHS:
            return QUANT_PATHS[path[:n]]
    if path[0] == "lm_eval":
        return f"lm_eval_{path[1]}" if len(path) > 1 and path[1] in LM_EVAL_KEYS else "lm_eval_include_path"
    return path[0] if path[0] in QUANT_FIELDS else "spec"


def check_quant_form(form: QuantForm, check_files: bool = True):
    """(the checked QuantSearchSpec or None, the first FieldError or None)."""
    from workbench.quant.search.spec import quant_search_spec_from_dict

    try:
        spec = quant_search_spec_from_dict(quant_form_dict(form), source=SOURCE)
    except WorkbenchError as e:
        return None, FieldError(quant_error_field(error_path(str(e))), problem_text(str(e)))
    if check_files:
        if (why := model_problem(spec.model)) is not None:
            return None, FieldError("model", why)
        for key, ref in (("fitness", spec.fitness), ("heldout_task", spec.heldout_task)):
            if ref != "kl" and (why := task_problem(ref)) is not None:
                return None, FieldError(key, why)
    return spec, None


def lm_eval_refs(spec) -> list[tuple[str, str]]:
    """(form field, lm_eval:NAME) of every lm-eval task a checked spec names: these load through
    lm-eval, seconds each, so the builders check them off the UI thread."""
    from workbench.eval.lm_eval_tasks import spec_lm_eval_refs

    return spec_lm_eval_refs(spec)


def builtin_tasks() -> list[str]:
    from workbench.tasks import builtin_task_files

    return list(builtin_task_files())


def default_spec_path(name: str) -> Path:
    """recipes/<name>-search.yml under the working directory (where the app saves recipes)."""
    stem = name.strip() or "search"
    return Path("recipes") / f"{stem.removesuffix('-search')}-search.yml"
