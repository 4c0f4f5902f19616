"""One checker for every YAML file workbench reads: recipes, search specs, quantization configs, tasks.

A file's schema is a :class:`Field` per key; a :class:`Reader` checks parsed YAML against it and
raises the caller's error class as ``file:line: field.path: problem``::

    LORA = {"rank": Field(int, 0, low=0), "init": Field(str, "svd", choices=("svd", "zeros"))}
    CONFIG = Field(dict, fields={"bits": Field(float, 2), "lora": Field(dict, {}, fields=LORA)})

    data, lines = parse_with_lines(text, "q.yml", QuantConfigError)
    r = Reader("q.yml", lines, QuantConfigError, root="config")
    cfg = r.check(data, CONFIG)   # {"bits": 2, "lora": {"rank": 0, "init": "svd"}}
    if cfg["bits"] == 1 and cfg["lora"]["rank"]:
        r.fail(("lora", "rank"), "...")   # cross-field rules stay with the caller, with the same fail

Rules, in the order they are checked:

- a key that is absent, or null, takes the field's default; absent with no default is an error
  (a required field given as null fails its type check);
- ``type``: int (not bool), float (an int too), bool, str, list, dict, a tuple of them, or object;
- ``nonempty``, then the bounds ``low``/``high`` (inclusive) and ``positive`` (> 0), then ``choices``;
- ``item``: a type every element of a list has (an error names the list), or a Field that each
  element is checked against (an error names the element, e.g. ``stages.1.keep``);
- ``fields``: the keys of a mapping; any other key is refused with the list of allowed ones. A
  missing (or null) sub-mapping reads as ``{}``, so its own defaults apply;
- ``check(value, path, fail)``: the field's own test, which returns the value (maybe converted);
- ``make``: builds the result, e.g. a dataclass from the checked mapping.

A problem reads ``expected <want>, got <value>``; ``want`` defaults to words for the type and
bounds ("a positive integer"), and ``msg`` (a string, or a function of the value) replaces the
whole problem.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import yaml


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a field that must be given
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping", object: "a value"}


@dataclass(frozen=True)
class Field:
    type: type | tuple = object
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    positive: bool = False
    choices: tuple | None = None
    nonempty: bool = False
    item: type | tuple | Field | None = None
    fields: dict[str, Field] | None = None
    check: Callable[[Any, tuple, Callable], Any] | None = None
    make: Callable | None = None
    want: str = ""
    msg: str | Callable[[Any], str] = ""
    doc: str = ""


def is_type(v: Any, t: type | tuple) -> bool:
    """isinstance, except that a bool is only a bool and an int is also a float."""
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(v, bool):
        return bool in ts or object in ts
    return isinstance(v, ts) or (float in ts and isinstance(v, int))


def describe(f: Field) -> str:
    """Words for what a field takes, e.g. 'a positive integer', 'one of a, b'."""
    if f.choices is not None:
        return "one of " + ", ".join(map(str, f.choices))
    kind = "integer" if f.type is int else "number"
    if f.type is int and f.low is not None and f.high is None:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(f.low, f"an integer >= {f.low}")
    if f.positive and f.high is None:
        return f"a positive {kind}"
    if f.positive or f.low is not None or f.high is not None:
        low = "(0" if f.positive else "(-inf" if f.low is None else f"[{f.low}"
        return f"{'an' if kind == 'integer' else 'a'} {kind} in {low}, {'inf)' if f.high is None else f'{f.high}]'}"
    types = f.type if isinstance(f.type, tuple) else (f.type,)
    name = " or ".join(_NAMES.get(t, t.__name__) for t in types)
    return name.replace("a ", "a non-empty ", 1) if f.nonempty and f.type in (str, list, dict) else name


class Reader:
    """Checks values against Fields and raises ``error("file:line: field.path: problem")``."""

    def __init__(self, source: str, lines: dict[tuple, int] | None = None, error: type[Exception] = ValueError,
                 root: str = "config"):
        self.source, self.lines, self.error, self.root = source, lines or {}, error, root

    def where(self, path: tuple) -> str:
        return field_location(self.source, self.lines, path)

    def fail(self, path: tuple, msg: str) -> NoReturn:
        raise self.error(f"{self.where(path)}: {'.'.join(map(str, path)) or self.root}: {msg}")

    def problem(self, f: Field, value: Any) -> str:
        if f.msg:
            return f.msg(value) if callable(f.msg) else f.msg
        return f"expected {f.want or describe(f)}, got {value!r}"

    def check(self, value: Any, f: Field, path: tuple = ()) -> Any:
        """The checked value of one field (its default when null), or raise naming ``path``."""
        if value is None and f.default is not REQUIRED:
            if f.default is None:
                return None
            value = copy.deepcopy(f.default)
            if f.fields is None:
                return value
        if not is_type(value, f.type) or (f.nonempty and not value):
            self.fail(path, self.problem(f, value))
        if ((f.low is not None and value < f.low) or (f.high is not None and value > f.high)
                or (f.positive and not value > 0) or (f.choices is not None and value not in f.choices)):
            self.fail(path, self.problem(f, value))
        if isinstance(f.item, Field):
            value = [self.check(v, f.item, (*path, i)) for i, v in enumerate(value)]
        elif f.item is not None and not all(is_type(v, f.item) for v in value):
            self.fail(path, self.problem(f, value))
        if f.fields is not None:
            value = self.read(value, f.fields, path)
        if f.check is not None:
            value = f.check(value, path, self.fail)
        if f.make is not None:
            value = f.make(**value) if isinstance(value, dict) else f.make(value)
        return value

    def read(self, data: dict, fields: dict[str, Field], path: tuple = ()) -> dict:
        """Every field of a mapping, checked, defaults filled in; an unknown key is refused."""
        for key in data:
            if key not in fields:
                self.fail((*path, key), f"unknown key; expected one of {', '.join(sorted(fields))}")
        out = {}
        for key, f in fields.items():
            if key not in data and f.default is REQUIRED:
                self.fail((*path, key), self.problem(f, None) if f.msg else "required field is missing")
            out[key] = self.check(data.get(key), f, (*path, key))
        return out


# --- YAML with the line of every field -----------------------------------------------------

def line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each field path of a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            out[key] = k.start_mark.line + 1
            line_map(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            line_map(v, (*path, i), out)
    return out


def parse_with_lines(text: str, source: str, error: type[Exception]) -> tuple[Any, dict[tuple, int]]:
    """(data, {field path: line}); invalid YAML raises `error` naming ``source:line``."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise error(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    return data, (line_map(node) if node is not None else {})


def field_location(source: str, lines: dict[tuple, int], path: tuple) -> str:
    """``source:line`` of a field path such as ('models', 1, 'parameters'), or of its nearest parent."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return f"{source}:{lines[path[:n]]}"
    return source
