"""The merge recipe: one YAML schema, validated in one place, that reads mergekit's configs.

A recipe is either a list of ``models`` merged whole, or a list of output ``slices``, each built
from ``sources`` with a ``layer_range`` (passthrough / frankenmerges)::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.6, density: [0.2, 0.8]}   # a list is a gradient over depth
      - model: ./lang
        parameters:
          weight: [{filter: mlp, value: 0.3}, {value: 0.5}]  # filters match tensor names
    parameters: {normalize: true}
    dtype: float32

Parameter values are a scalar, a gradient (list of numbers, interpolated linearly over the
layers of a slice) or a list of ``{filter, value}`` conditions (the first whose filter is a
substring of the tensor name wins). Per-model values override slice values, which override
the global ``parameters``. Everything is checked here, before any tensor is read; errors name
the file, the line and the field.

A model reference ``BASE+ADAPTER`` (mergekit's syntax) is a base model plus a peft LoRA adapter
directory, applied tensor by tensor as the tensors are read (:mod:`workbench.models.lora`); a
model path that itself holds a ``+`` is written ``{model: {path: ...}}`` (mergekit's explicit
form, which also takes ``{model: {path: BASE}, lora: {path: ADAPTER}}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import RecipeError, WorkbenchError
from workbench.merge.methods import METHODS, MergeMethod, ParamSpec
from workbench.schema import Field, Reader, field_location, parse_with_lines

DTYPES = ("float32", "float16", "bfloat16", "float64")
DEMO_VARIANTS = ("variant-a", "variant-b")  # what `workbench demo` makes beside the default model
UNSUPPORTED_TOP = {"modules": "multi-module recipes (`modules:`) are not supported; use `models:` or `slices:`",
                   "tokenizer": "the `tokenizer:` block is not supported; use `tokenizer_source:`"}


@dataclass
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # only for slice sources


@dataclass
class OutputSlice:
    sources: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    name: str | None = None
    source: str = "<recipe>"  # file the recipe came from, for messages and relative paths
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)
    # references holding a '+' that are paths, not BASE+ADAPTER (written {model: {path: ...}})
    literal_refs: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        refs = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            refs.append(entry.model)
        for s in self.slices or []:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    def model_field(self, ref: str) -> tuple:
        """The field path where ``ref`` first appears, e.g. ('models', 0, 'model')."""
        if self.base_model == ref:
            return ("base_model",)
        for i, entry in enumerate(self.models or []):
            if entry.model == ref:
                return ("models", i, "model")
        for i, s in enumerate(self.slices or []):
            if s.base_model == ref:
                return ("slices", i, "base_model")
            for j, src in enumerate(s.sources):
                if src.model == ref:
                    return ("slices", i, "sources", j, "model")
        return ("models",)

    def is_lora_ref(self, ref: str | None) -> bool:
        """Whether ``ref`` is mergekit's ``BASE+ADAPTER`` (a '+' in a reference not written as a path)."""
        return ref is not None and "+" in ref and ref not in self.literal_refs

    def model_candidates(self, ref: str) -> list[Path]:
        """Where a model reference may be: the one rule of `workbench.models.loader.model_candidates`
        (as written, relative to the recipe, in the home)."""
        from workbench.models.loader import model_candidates

        return model_candidates(ref, None if self.source == "<recipe>" else Path(self.source).parent)

    def find_model(self, ref: str):
        """The absolute path of a model reference (the first candidate that exists), else None;
        for ``BASE+ADAPTER`` a :class:`~workbench.models.lora.LoraRef` of both parts, found so."""
        if self.is_lora_ref(ref):
            from workbench.models.lora import LoraRef, split_lora_ref

            try:
                parts = [self.find_model(p) for p in split_lora_ref(ref)]
            except WorkbenchError as e:
                path = self.model_field(ref)
                raise RecipeError(f"{self.where(path)}: {'.'.join(map(str, path))}: {e}") from None
            return LoraRef(*parts) if None not in parts else None
        return next((c.absolute() for c in self.model_candidates(ref) if c.exists()), None)

    def resolve_model(self, ref: str) -> Path:
        """A model reference as a path: as written, else relative to the recipe, else in the home."""
        return self.resolve_models([ref])[0]

    def resolve_models(self, refs: list[str] | None = None) -> list[Path]:
        """Absolute paths of ``refs`` (default: every referenced model). A missing one raises one
        line naming the first missing model's field, the others missing, and how to make them."""
        refs = self.referenced_models() if refs is None else refs
        found = {ref: self.find_model(ref) for ref in refs}
        missing = [ref for ref in refs if found[ref] is None]
        if missing:
            raise RecipeError(self._missing_message(missing))
        return [found[ref] for ref in refs]

    def _missing_message(self, missing: list[str]) -> str:
        ref, path = missing[0], self.model_field(missing[0])
        what = f"model {ref!r}"
        if self.is_lora_ref(ref):
            from workbench.models.lora import split_lora_ref

            base, adapter = split_lora_ref(ref)
            part = base if self.find_model(base) is None else adapter
            what = f"model {ref!r}: {'base model' if part == base else 'LoRA adapter'} {part!r}"
            ref = part
        looked = ", ".join(str(c) for c in self.model_candidates(ref))
        msg = f"{self.where(path)}: {'.'.join(map(str, path))}: {what} not found (looked in: {looked})"
        if len(missing) > 1:
            msg += "; also missing: " + ", ".join(repr(m) for m in missing[1:])
        hint = missing_model_hint(missing)
        return msg + (f"; {hint}" if hint else "")

    def with_model_paths(self, paths: dict[str, str]) -> Recipe:
        """A copy naming each model ``ref`` as ``paths[ref]`` (refs not in ``paths`` stay as written);
        parameters, slices, order and every other field are kept. A reference keeps its kind: a
        ``BASE+ADAPTER`` stays one, a path stays a path (though it hold a '+')."""
        def sub(ref: str | None) -> str | None:
            return paths.get(ref, ref) if ref is not None else None

        literal = frozenset(sub(ref) for ref in [*self.referenced_models(), self.tokenizer_source]
                            if ref is not None and not self.is_lora_ref(ref) and "+" in sub(ref))

        def entry(e: ModelEntry) -> ModelEntry:
            return replace(e, model=sub(e.model), parameters=dict(e.parameters))

        return replace(
            self, base_model=sub(self.base_model),
            models=[entry(e) for e in self.models] if self.models is not None else None,
            slices=([OutputSlice(sources=[entry(src) for src in s.sources], base_model=sub(s.base_model),
                                 parameters=dict(s.parameters)) for s in self.slices]
                    if self.slices is not None else None),
            parameters=dict(self.parameters),
            tokenizer_source=sub(self.tokenizer_source) if self.tokenizer_source not in ("base", "union")
            else self.tokenizer_source, literal_refs=literal)

    def resolved(self) -> Recipe:
        """A copy naming every model by the absolute path it resolves to (what mergekit reads)."""
        refs = self.referenced_models()
        return self.with_model_paths({ref: str(p) for ref, p in zip(refs, self.resolve_models(refs))})

    def where(self, path: tuple) -> str:
        """``file:line`` for a field path such as ('models', 1, 'parameters', 'weight')."""
        return field_location(self.source, self.lines, path)

    def to_dict(self) -> dict:
        """The recipe in mergekit's form (what :func:`dump_recipe` writes)."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.models is not None:
            out["models"] = [_entry_dict(m) for m in self.models]
        if self.slices is not None:
            out["slices"] = []
            for s in self.slices:
                d: dict[str, Any] = {"sources": [_entry_dict(src) for src in s.sources]}
                if s.base_model:
                    d["base_model"] = s.base_model
                if s.parameters:
                    d["parameters"] = s.parameters
                out["slices"].append(d)
        if self.parameters:
            out["parameters"] = self.parameters
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _entry_dict(entry: ModelEntry) -> dict:
    d: dict[str, Any] = {"model": entry.model}
    if entry.layer_range is not None:
        d["layer_range"] = list(entry.layer_range)
    if entry.parameters:
        d["parameters"] = entry.parameters
    return d


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return parse_recipe(path.read_text(), source=str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    data, lines = parse_with_lines(text, source, RecipeError)
    return recipe_from_dict(data, source=source, lines=lines)


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """YAML that both workbench and mergekit read, laid out like the recipes in ``recipes/``.

    A model path that mergekit would misread (``+`` starts a LoRA, ``@`` a revision) is written
    in mergekit's explicit form ``{model: {path: ...}}``, which workbench reads too; a
    ``BASE+ADAPTER`` reference is written as it is (``{model: {path: BASE}, lora: {path: ADAPTER}}``
    when a part holds an ``@``)."""
    data = _explicit_model_paths(recipe.to_dict(), recipe)
    body = yaml.dump(data, Dumper=RecipeDumper, sort_keys=False, allow_unicode=True, width=10**6)
    return header + body


def save_recipe(recipe: Recipe, path: str | Path, overwrite: bool = True, header: str = "") -> Path:
    """Write ``recipe`` atomically; refuse an existing file unless ``overwrite``."""
    from workbench.atomic import atomic_file, check_output

    check_output(path, overwrite, file=True)
    text = dump_recipe(recipe, header)
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_resolved_recipe(recipe_path: str | Path, out_path: str | Path, overwrite: bool = False) -> Path:
    """Write the recipe at ``recipe_path`` to ``out_path`` with every model named by its absolute
    path (short names in the home, paths relative to the recipe), for ``mergekit-yaml``. The
    leading comment of the recipe is kept (less its notes on mergekit: the copy is what they
    describe); the rest is written from the parsed recipe. An existing ``out_path`` is refused
    unless ``overwrite``."""
    from workbench.atomic import check_output

    check_output(out_path, overwrite, file=True)
    recipe = load_recipe(recipe_path)
    text = Path(recipe_path).read_text()
    comment = "".join(line + "\n" for line in _leading_comment(text))
    header = comment + f"# {recipe_path} with every model by its absolute path (for mergekit-yaml)\n"
    return save_recipe(recipe.resolved(), out_path, overwrite=overwrite, header=header)


def _leading_comment(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if "mergekit" not in line:
            lines.append(line)
    return lines


class RecipeDumper(yaml.SafeDumper):
    """Block style with lists indented under their key; flow style for lists of scalars and for
    mappings of numbers: ``layer_range: [0, 20]``, ``parameters: {weight: 0.6, density: 0.5}``."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) or (isinstance(v, list) and bool(v) and all(_is_number(x) for x in v))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    condition = "value" in data and set(data) <= {"filter", "value"} and not isinstance(data["value"], dict)
    flow = bool(data) and (condition or all(_is_number(v) for v in data.values()))
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)


class _ExplicitRef(dict):
    """mergekit's ``{model: {path: ...}}``, written in flow style."""


def _represent_ref(dumper: yaml.SafeDumper, data: _ExplicitRef) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", dict(data), flow_style=True)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


RecipeDumper.add_representer(list, _represent_list)
RecipeDumper.add_representer(dict, _represent_dict)
RecipeDumper.add_representer(str, _represent_str)
RecipeDumper.add_representer(_ExplicitRef, _represent_ref)


def _explicit_model_paths(data: dict, recipe: Recipe) -> dict:
    """``{model: {path: ...}}`` for model paths with ``+`` or ``@`` (see :func:`dump_recipe`)."""
    def ref(value: str) -> Any:
        if recipe.is_lora_ref(value):
            base, adapter = value.split("+", 1)
            if "@" not in value:
                return value
            return _ExplicitRef(model={"path": base}, lora={"path": adapter})
        return _ExplicitRef(model={"path": value}) if ("+" in value or "@" in value) else value

    def entries(items: list[dict]) -> list[dict]:
        return [{**e, "model": ref(e["model"])} for e in items]

    out = dict(data)
    if "base_model" in out:
        out["base_model"] = ref(out["base_model"])
    if "models" in out:
        out["models"] = entries(out["models"])
    if "slices" in out:
        out["slices"] = [{**s, "sources": entries(s["sources"]),
                          **({"base_model": ref(s["base_model"])} if "base_model" in s else {})}
                         for s in out["slices"]]
    return out


def missing_model_hint(missing: list[str]) -> str:
    """How to make missing models that workbench itself makes: the default model, the demo's
    variants of it, the zoo's experts; '' when none of them is such a name."""
    from workbench.home import DEFAULT_MODEL_NAME

    try:
        from workbench.zoo.build import EXPERTS
        experts = set(EXPERTS)
    except ImportError:  # pragma: no cover - the zoo is part of the package
        experts = set()
    demo_variants = {f"{DEFAULT_MODEL_NAME}-{v}" for v in DEMO_VARIANTS}
    hints = []
    if demo_variants & set(missing):
        hints.append("run `workbench demo` to make the demo variants")
    if experts & set(missing):
        hints.append("run `workbench zoo build` to train the zoo experts")
    if DEFAULT_MODEL_NAME in missing and not hints:  # the demo and the zoo build make it too
        hints.append("run `workbench models prepare-default` to make the default model")
    return "; ".join(hints)


# --- validation ----------------------------------------------------------------------------

class _LiteralPath(str):
    """A reference written ``{model: {path: ...}}``: a path even if it holds a '+'."""


def _model_ref(value: Any, path: tuple, fail) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit also accepts {model: {path: ...}, lora: ...}
        def part(v: Any, key: str) -> str:
            v = v.get("path") if isinstance(v, dict) else v
            if not isinstance(v, str) or not v:
                fail((*path, key), "expected a model path or name, or {path: ...}")
            return v

        extra = set(value) - {"model", "lora", "override_architecture"}
        if extra:
            fail((*path, sorted(extra)[0]), "a model reference is {model: {path: ...}, lora: {path: ...}}")
        model = part(value["model"], "model")
        if value.get("lora") is None:
            return _LiteralPath(model) if "+" in model else model
        lora = part(value["lora"], "lora")
        if "+" in model or "+" in lora:
            fail(path, "a model or adapter path holding a '+' cannot be combined with a LoRA adapter")
        return f"{model}+{lora}"
    if not isinstance(value, str) or not value:
        fail(path, "expected a model path or name")
    if value.count("+") > 1 or value.startswith("+") or value.endswith("+"):
        fail(path, f"{value!r}: a LoRA reference is BASE+ADAPTER with one '+'; "
                   "a path holding a '+' is written {model: {path: ...}}")
    return value


def _plain_refs(recipe: Recipe) -> Recipe:
    """Record the references written as paths (``_LiteralPath``) and make every reference a plain str."""
    literal = set()

    def plain(ref):
        if isinstance(ref, _LiteralPath):
            literal.add(str(ref))
        return str(ref) if ref is not None else None

    recipe.base_model = plain(recipe.base_model)
    for e in recipe.models or []:
        e.model = plain(e.model)
    for s in recipe.slices or []:
        s.base_model = plain(s.base_model)
        for src in s.sources:
            src.model = plain(src.model)
    recipe.literal_refs = frozenset(literal)
    return recipe


def _layer_range(lr: list, path: tuple, fail) -> tuple[int, int]:
    if len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]:
        fail(path, f"expected [start, end] with 0 <= start < end, got {lr!r}")
    return (lr[0], lr[1])


MODEL = Field(object, check=_model_ref, msg="expected a model path or name")
PARAMETERS = Field(dict, {}, msg="expected a mapping of parameter names to values")  # names: per method, below
ENTRY = {"model": MODEL, "parameters": PARAMETERS}
SOURCE = {**ENTRY, "layer_range": Field(list, check=_layer_range,
                                        msg=lambda lr: f"expected [start, end] with 0 <= start < end, got {lr!r}")}
DTYPE = Field(str, None, choices=DTYPES, msg=lambda v: f"{v!r} is not a dtype; expected one of {', '.join(DTYPES)}")
RECIPE = Field(dict, msg="expected a mapping with at least `merge_method` and `models` or `slices`", fields={
    "merge_method": Field(str, choices=tuple(METHODS), msg=lambda v: (
        f"unknown method {v!r}; known: {', '.join(sorted(METHODS))}" if isinstance(v, str)
        else f"required; one of {', '.join(sorted(METHODS))}")),
    "base_model": Field(object, None, check=_model_ref),
    "models": Field(list, None, nonempty=True, msg="expected a non-empty list of {model, parameters}",
                    item=Field(dict, fields=ENTRY, msg="expected a mapping with model, parameters")),
    "slices": Field(list, None, nonempty=True, msg="expected a non-empty list of {sources: [...]}", item=Field(
        dict, msg="expected a mapping with `sources`", fields={
            "sources": Field(list, nonempty=True, msg="expected a non-empty list of {model, layer_range}",
                             item=Field(dict, fields=SOURCE, msg="expected a mapping with layer_range, model, "
                                                                 "parameters")),
            "base_model": Field(object, None, check=_model_ref),
            "parameters": PARAMETERS,
            "residual_weight": Field(object, None, doc="mergekit's; read and ignored")})),
    "parameters": PARAMETERS,
    "dtype": DTYPE, "out_dtype": DTYPE,
    "tokenizer_source": Field(str, None), "chat_template": Field(str, None), "name": Field(str, None),
})


def recipe_from_dict(data: Any, source: str = "<recipe>", lines: dict | None = None) -> Recipe:
    """Build a :class:`Recipe` from parsed YAML, checking every field."""
    r = Reader(source, lines, RecipeError, root="recipe")
    for key in data if isinstance(data, dict) else ():
        if key in UNSUPPORTED_TOP:
            r.fail((key,), UNSUPPORTED_TOP[key])
    if isinstance(data, dict) and (data.get("models") is None) == (data.get("slices") is None):
        r.fail((), "exactly one of `models` or `slices` is required")
    v = r.check(data, RECIPE)
    method = METHODS[v["merge_method"]]

    def entry(e: dict, path: tuple) -> ModelEntry:
        return ModelEntry(e["model"], _check_params(e["parameters"], method, (*path, "parameters"), r.fail, "model"),
                          e.get("layer_range"))

    recipe = Recipe(**{**v, "models": None, "slices": None}, source=source, lines=r.lines)
    recipe.parameters = _check_params(v["parameters"], method, ("parameters",), r.fail, scope="any")
    if v["models"] is not None:
        recipe.models = [entry(e, ("models", i)) for i, e in enumerate(v["models"])]
    else:
        recipe.slices = []
        for i, s in enumerate(v["slices"]):
            path = ("slices", i)
            sources = [entry(e, (*path, "sources", j)) for j, e in enumerate(s["sources"])]
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
            if len(lengths) > 1:
                r.fail((*path, "sources"), f"all sources of a slice need the same number of layers, got {sorted(lengths)}")
            recipe.slices.append(OutputSlice(sources=sources, base_model=s["base_model"], parameters=_check_params(
                s["parameters"], method, (*path, "parameters"), r.fail, scope="any")))
    _check_structure(recipe, method, r.fail)
    return _plain_refs(recipe)


def _check_params(params: Any, method: MergeMethod, path: tuple, fail, scope: str) -> dict:
    """Check the names, types and ranges of a parameters mapping (values may be gradients/filters)."""
    for name, value in params.items():
        spec = method.params.get(name)
        if spec is None:
            known = ", ".join(sorted(method.params)) or "none"
            fail((*path, name), f"unknown parameter for {method.name}; it takes: {known}")
        if scope == "model" and not spec.per_model:
            fail((*path, name), f"{name} is a shared parameter of {method.name}; set it under the top-level or slice `parameters`")
        _check_setting(value, spec, (*path, name), fail)
    return dict(params)


def _check_setting(value: Any, spec: ParamSpec, path: tuple, fail) -> None:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            fail(path, "empty list")
        if all(isinstance(v, dict) for v in value):
            for i, cond in enumerate(value):
                extra = set(cond) - {"filter", "value"}
                if extra or "value" not in cond:
                    fail((*path, i), "a condition is {filter: <substring of tensor name>, value: ...}")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    fail((*path, i, "filter"), "expected a string")
                _check_setting(cond["value"], spec, (*path, i, "value"), fail)
            return
        if any(isinstance(v, (dict, list)) for v in value):
            fail(path, "a gradient is a flat list of numbers")
        for i, v in enumerate(value):
            _check_scalar(v, spec, (*path, i), fail)
        return
    _check_scalar(value, spec, path, fail)


def _check_scalar(v: Any, spec: ParamSpec, path: tuple, fail) -> None:
    if spec.kind is bool:
        if not isinstance(v, bool):
            fail(path, f"expected true or false, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(path, f"expected a number, got {v!r}")
    if spec.low is not None and v < spec.low or spec.high is not None and v > spec.high:
        fail(path, f"{v} is out of range [{spec.low}, {spec.high}]")


def _check_structure(r: Recipe, method: MergeMethod, fail) -> None:
    """Base model, model counts and required parameters, per group of merged tensors."""
    groups = []  # (path, base, non-base entries, scopes that may hold parameters)
    if r.models is not None:
        names = [m.model for m in r.models]
        base = r.base_model
        if method.base == "none":
            base = None
        others = [m for m in r.models if m.model != base]
        groups.append((("models",), base, others, [r.parameters]))
        if len(set(names)) != len(names):
            fail(("models",), "a model is listed twice")
    else:
        for i, s in enumerate(r.slices):
            base = (s.base_model or r.base_model) if method.base != "none" else None
            if base is not None and base not in [src.model for src in s.sources]:
                if method.base == "required" or s.base_model:
                    fail(("slices", i, "sources"), f"the base model {base!r} must be one of the slice's sources")
                base = None
            others = [src for src in s.sources if src.model != base]
            groups.append((("slices", i, "sources"), base, others, [s.parameters, r.parameters]))

    for path, base, others, shared_scopes in groups:
        if method.base == "required" and base is None:
            fail(("base_model",), f"{method.name} needs a base_model")
        n = len(others)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
            fail(path, f"{method.name} takes {want} model(s) besides the base, got {n}")
        for name, spec in method.params.items():
            if not spec.required:
                continue
            if spec.per_model:
                for j, entry in enumerate(others):
                    if name not in entry.parameters and not any(name in sc for sc in shared_scopes):
                        fail((*path, j, "parameters"), f"{entry.model}: required parameter {name!r} is missing")
            elif not any(name in sc for sc in shared_scopes):
                fail(("parameters",), f"{method.name} needs the parameter {name!r}")


# --- resolution per tensor -----------------------------------------------------------------

def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for a tensor at relative depth ``t`` in [0, 1]."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(c, dict) for c in setting):
            for cond in setting:
                f = cond.get("filter")
                if f is None or f == "*" or f in tensor_name:
                    return evaluate_setting(cond["value"], tensor_name, t)
            return None
        if any(isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve_param(name: str, spec: ParamSpec, scopes: list[dict], tensor_name: str, t: float) -> Any:
    """First scope (highest precedence first) that sets ``name`` for this tensor, else the default."""
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return spec.kind(value) if spec.kind is not bool else value
    if spec.required:
        raise RecipeError(f"required parameter {name!r} has no value for tensor {tensor_name}")
    return spec.default
