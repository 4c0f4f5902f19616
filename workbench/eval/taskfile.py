"""Task files: a YAML header (``NAME.yml``) plus JSONL items, loaded and validated in one place.

Header fields::

    name: arc_mini                  # required
    type: multiple_choice           # multiple_choice | exact_match | perplexity | kl
    description: ...                # optional
    items: arc_mini.jsonl           # required, relative to the header
    chat_template: false            # wrap context/prompt as a user message (+ generation prompt)
    num_fewshot: 0                  # examples drawn from fewshot_split, never the evaluated split
    fewshot_split: fewshot
    target_delimiter: " "           # between context and choice/answer ("" with chat_template)
    fewshot_delimiter: "\\n\\n"     # between few-shot examples (no chat template)
    stop: ["\\n"]                   # exact_match: stop strings
    max_new_tokens: 32              # exact_match
    normalize: [strip]              # exact_match: strip lower collapse_whitespace strip_punctuation
    max_length: 512                 # perplexity/kl: window length in tokens
    stride: 256                     # perplexity/kl: new tokens scored per window (<= max_length)
    max_tokens: 4096                # perplexity/kl: tokens per split (documents taken in order)
    reference: SmolLM2-135M-Instruct  # kl: teacher model directory or name in the home's models/
    top_k: 32                       # kl

Items, one JSON object per line, each with a ``split`` (and optionally ``id``/``meta``)::

    multiple_choice  {"split", "context", "choices": [...], "gold": int}
    exact_match      {"split", "prompt", "answers": [...]}
    perplexity / kl  {"split", "file": PATH} or {"split", "text": ...}   # PATH may use {os_licenses}

The same item (same context / prompt / text / file) in two splits is an error. Every error is a
:class:`TaskError` naming ``file:line: field: problem``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.schema import Field, Reader, parse_with_lines

TYPES = ("multiple_choice", "exact_match", "perplexity", "kl")
NORMALIZERS = ("strip", "lower", "collapse_whitespace", "strip_punctuation")
OS_LICENSES = "/usr/share/common-licenses"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "tasks"
HELDOUT_SPLIT = "heldout"

COMMON = {"name", "type", "description", "items", "chat_template"}
BY_TYPE = {
    "multiple_choice": {"num_fewshot", "fewshot_split", "target_delimiter", "fewshot_delimiter"},
    "exact_match": {"num_fewshot", "fewshot_split", "target_delimiter", "fewshot_delimiter", "stop",
                    "max_new_tokens", "normalize"},
    "perplexity": {"max_length", "stride", "max_tokens"},
    "kl": {"max_length", "stride", "max_tokens", "reference", "top_k"},
}
ITEM_FIELDS = {
    "multiple_choice": ({"context", "choices", "gold"}, set()),
    "exact_match": ({"prompt", "answers"}, set()),
    "perplexity": (set(), {"file", "text"}),
    "kl": (set(), {"file", "text"}),
}
ITEM_EXTRA = {"split", "id", "meta"}


class TaskError(WorkbenchError, ValueError):
    """A task header or item that does not validate."""


@dataclass(frozen=True)
class Item:
    """One JSONL item: its split, its line in the file and its fields."""

    split: str
    line: int
    data: dict

    @property
    def key(self) -> str:
        """What identifies the item across splits (context, prompt, text or file)."""
        d = self.data
        raw = d.get("context", d.get("prompt", d.get("text", d.get("file", ""))))
        if "choices" in d and not str(raw).strip():  # an empty context: the choices tell items apart
            raw = json.dumps(d["choices"])
        return " ".join(str(raw).split())


@dataclass
class Task:
    """A validated task: header fields with defaults filled in, and its items."""

    name: str
    type: str
    path: Path
    items_path: Path
    items: list[Item]
    description: str = ""
    chat_template: bool = False
    num_fewshot: int = 0
    fewshot_split: str | None = None
    target_delimiter: str | None = " "
    fewshot_delimiter: str = "\n\n"
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    normalize: list[str] = field(default_factory=lambda: ["strip"])
    max_length: int = 512
    stride: int | None = None
    max_tokens: int | None = None
    reference: str | None = None
    top_k: int = 32
    fingerprint: str = ""
    source: Any = None  # type lm_eval: the lm-eval side (`workbench.eval.lm_eval_tasks.LmEvalSource`)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(it.split for it in self.items))

    def split_items(self, split: str) -> list[Item]:
        """The items of ``split`` in file order; an unknown split is an error."""
        out = [it for it in self.items if it.split == split]
        if not out:
            raise TaskError(f"{self.items_path}: split: task {self.name!r} has no split {split!r} "
                            f"(splits: {', '.join(self.splits) or 'none'})")
        return out

    def resolve_reference(self) -> Path:
        """The kl teacher as a path, by the one rule of `workbench.models.loader.model_candidates`
        (as written, relative to the header, in the home)."""
        from workbench.models.loader import model_candidates

        ref = str(self.reference)
        cands = model_candidates(ref, self.path.parent)
        for c in cands:
            if (c / "config.json").is_file():
                return c.absolute()
        raise TaskError(f"{self.path}: reference: model {ref!r} not found "
                        f"(looked in: {', '.join(str(c) for c in cands)})")

    def document_text(self, item: Item) -> str:
        """The text of a perplexity/kl item (read from its file if it names one)."""
        if "text" in item.data:
            return item.data["text"]
        return _item_file(self, item).read_text(encoding="utf-8", errors="replace")


def _item_file(task: Task, item: Item) -> Path:
    p = Path(str(item.data["file"]).replace("{os_licenses}", OS_LICENSES)).expanduser()
    return p if p.is_absolute() else task.items_path.parent / p


def resolve_task_path(ref: str | Path) -> Path:
    """A task reference as a header path: an existing file, else a built-in task by name."""
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    name = p.name.removesuffix(".yml").removesuffix(".yaml")
    for cand in (BUILTIN_DIR / f"{name}.yml", BUILTIN_DIR / f"{name}.yaml"):
        if str(ref) in (name, f"{name}.yml", f"{name}.yaml") and cand.is_file():
            return cand
    available = sorted(q.stem for q in BUILTIN_DIR.glob("*.y*ml")) if BUILTIN_DIR.is_dir() else []
    raise TaskError(f"{ref}: no such task file or built-in task (built-in: {', '.join(available) or 'none'})")


def _strings(v: list, path: tuple, fail) -> list[str]:
    if not all(isinstance(s, str) and s for s in v):
        fail(path, f"expected a list of non-empty strings, got {v!r}")
    return list(v)


HEADER = {
    "name": Field(str, nonempty=True, want="a non-empty string"),
    "type": Field(str, choices=TYPES, msg=lambda v: f"{v!r} is not one of {', '.join(TYPES)}"),
    "description": Field(str, "", want="str"),
    "items": Field(str, nonempty=True, want="a non-empty file name"),
    "chat_template": Field(bool, False, want="bool"),
    "num_fewshot": Field(int, 0, low=0, want="an integer >= 0"),
    "fewshot_split": Field(str, None, nonempty=True, want="a split name"),
    "target_delimiter": Field(str, None, want="str", doc="None: '' with chat_template, else ' '"),
    "fewshot_delimiter": Field(str, "\n\n", want="str"),
    "stop": Field(list, [], check=_strings, want="a list of strings"),
    "max_new_tokens": Field(int, 32, low=1, want="an integer >= 1"),
    "normalize": Field(list, ["strip"], check=_strings, want="a list of strings"),
    "max_length": Field(int, 512, low=2),
    "stride": Field(int, None, low=1, want="an integer >= 1"),
    "max_tokens": Field(int, None, low=1, want="an integer >= 1"),
    "reference": Field(str, None, nonempty=True, want="a model directory or name"),
    "top_k": Field(int, 32, low=1, want="an integer >= 1"),
}


def load_task(ref: str | Path, lm_eval: Any = None) -> Task:
    """Load and validate a task header and its items; raises :class:`TaskError`.

    ``lm_eval:NAME`` loads an lm-evaluation-harness task (``lm_eval``: its
    :class:`~workbench.eval.lm_eval_tasks.LmEvalOptions`)."""
    from workbench.eval.lm_eval_tasks import is_lm_eval, load_lm_eval_task  # it imports this module

    if is_lm_eval(ref):
        return load_lm_eval_task(ref, lm_eval)
    path = resolve_task_path(ref)
    head, lines = parse_with_lines(path.read_text(encoding="utf-8"), str(path), TaskError)
    if not isinstance(head, dict):
        raise TaskError(f"{path}: a task header must be a YAML mapping")
    lines.pop((), None)  # a missing field is named without a line
    r = Reader(str(path), lines, TaskError, root="task")
    for key in ("name", "type", "items"):
        if key not in head:
            r.fail((key,), "required field is missing")
    ttype = r.check(head["type"], HEADER["type"], ("type",))
    allowed = COMMON | BY_TYPE[ttype]
    for key in head:
        if key not in allowed:
            other = [t for t in TYPES if key in BY_TYPE[t]]
            r.fail((key,), f"only used by type {', '.join(other)}" if other else
                   f"unknown field (expected: {', '.join(sorted(allowed))})")
    h = r.read(head, HEADER)  # the fields of other types (refused above) take their defaults
    task = Task(**{k: v for k, v in h.items() if k != "items"}, path=path.absolute(),
                items_path=path.parent / h["items"], items=[])
    if task.target_delimiter is None:
        task.target_delimiter = "" if task.chat_template else " "
    for n in task.normalize:
        if n not in NORMALIZERS:
            r.fail(("normalize",), f"{n!r} is not one of {', '.join(NORMALIZERS)}")
    if task.stride is not None and task.stride > task.max_length:
        r.fail(("stride",), f"{task.stride} is larger than max_length {task.max_length}")
    if ttype == "kl" and not task.reference:
        r.fail(("reference",), "required for type kl (the teacher model)")
    if task.num_fewshot and not task.fewshot_split:
        r.fail(("num_fewshot",), f"{task.num_fewshot} few-shot examples need a fewshot_split")
    if not task.items_path.is_file():
        r.fail(("items",), f"{task.items_path} does not exist")

    task.items = _load_items(task)
    if task.num_fewshot:
        shots = [it for it in task.items if it.split == task.fewshot_split]
        if len(shots) < task.num_fewshot:
            r.fail(("num_fewshot",), f"{task.num_fewshot} few-shot examples asked but split "
                                     f"{task.fewshot_split!r} has {len(shots)} items")
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    digest.update(task.items_path.read_bytes())
    task.fingerprint = digest.hexdigest()
    return task


def _load_items(task: Task) -> list[Item]:
    need, one_of = ITEM_FIELDS[task.type]
    allowed = need | one_of | ITEM_EXTRA
    items: list[Item] = []
    seen: dict[str, Item] = {}
    fname = task.items_path
    with open(fname, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TaskError(f"{fname}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(d, dict):
                raise TaskError(f"{fname}:{n}: an item must be a JSON object, got {type(d).__name__}")
            fail = Reader(str(fname), {(): n}, TaskError).fail  # fail((key,), msg): "file:n: key: msg"
            for key in d:
                if key not in allowed:
                    fail((key,), f"unknown field for a {task.type} item (expected: {', '.join(sorted(allowed))})")
            for key in ["split", *sorted(need)]:
                if key not in d:
                    fail((key,), "required field is missing")
            if not isinstance(d["split"], str) or not d["split"]:
                fail(("split",), f"expected a split name, got {d['split']!r}")
            _check_item(task, d, fail)
            item = Item(d["split"], n, d)
            prev = seen.get(item.key)
            if prev is not None and prev.split != item.split:
                field_name = next(k for k in ("context", "prompt", "text", "file") if k in d)
                fail((field_name,), f"same item as line {prev.line} (split {prev.split!r}) but in split "
                                    f"{item.split!r}: splits must be disjoint")
            seen.setdefault(item.key, item)
            items.append(item)
    if not items:
        raise TaskError(f"{fname}: no items")
    return items


def _check_item(task: Task, d: dict, fail) -> None:
    def is_str_list(v: Any, nonempty: bool) -> bool:
        return isinstance(v, list) and len(v) > 0 and \
            all(isinstance(s, str) and (s.strip() or not nonempty) for s in v)

    if task.type == "multiple_choice":
        if not isinstance(d["context"], str):
            fail(("context",), f"expected a string, got {d['context']!r}")
        ch = d["choices"]
        if not is_str_list(ch, True) or len(ch) < 2:
            fail(("choices",), f"expected a list of at least 2 non-blank strings, got {ch!r}")
        g = d["gold"]
        if not isinstance(g, int) or isinstance(g, bool):
            fail(("gold",), f"expected an integer index, got {g!r}")
        if not 0 <= g < len(ch):
            fail(("gold",), f"{g} is out of range for {len(ch)} choices")
    elif task.type == "exact_match":
        if not isinstance(d["prompt"], str) or not d["prompt"]:
            fail(("prompt",), f"expected a non-empty string, got {d['prompt']!r}")
        if not is_str_list(d["answers"], True):
            fail(("answers",), f"expected a list of non-blank strings, got {d['answers']!r}")
    else:
        has = [k for k in ("file", "text") if k in d]
        if len(has) != 1:
            fail(("file",), "give exactly one of file or text" if has else "required: file or text")
        k = has[0]
        if not isinstance(d[k], str) or not d[k].strip():
            fail((k,), f"expected a non-empty string, got {d[k]!r}")
        if k == "file":
            p = _item_file(task, Item(d["split"], 0, d))
            if not p.is_file():
                fail(("file",), f"{p} does not exist")


def normalize_text(s: str, steps: list[str]) -> str:
    """Apply exact_match normalizers in a fixed order: lower, strip_punctuation, collapse, strip."""
    if "lower" in steps:
        s = s.lower()
    if "strip_punctuation" in steps:
        s = re.sub(r"[^\w\s]", "", s)
    if "collapse_whitespace" in steps:
        s = " ".join(s.split())
    if "strip" in steps:
        s = s.strip()
    return s


def check_search_objective(task: Task, split: str) -> None:
    """Refuse ``heldout`` (and unknown splits) as a search objective, as mergekit-evolve refuses benchmarks."""
    if task.type == "lm_eval":
        from workbench.eval.lm_eval_tasks import check_lm_eval_objective

        check_lm_eval_objective(task)
    if split.lower() == HELDOUT_SPLIT or split.lower().startswith(HELDOUT_SPLIT + "_"):
        raise TaskError(f"{task.path}: split: {split!r} of task {task.name!r} is held out for reporting and "
                        f"cannot be a search objective (use e.g. 'search')")
    if task.num_fewshot and split == task.fewshot_split:
        raise TaskError(f"{task.path}: split: {split!r} of task {task.name!r} holds the few-shot examples "
                        f"and cannot be a search objective")
    task.split_items(split)
