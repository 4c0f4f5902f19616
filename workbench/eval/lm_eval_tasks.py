"""lm-evaluation-harness tasks as workbench tasks: ``lm_eval:NAME`` anywhere a task is named.

lm-eval builds the requests (its ``TaskManager``, the task's few-shot sampler, chat template and
``construct_requests``); the workbench's evaluator scores them (batched log-likelihoods, batched
greedy generation); lm-eval turns the answers into metrics (the task's filters, ``process_results``
and ``aggregation``), so the numbers are lm-eval's numbers. Needs the ``workbench[lm-eval]`` extra.

Splits are the workbench's: the task's evaluation documents (test, else validation, as lm-eval
picks them) are shuffled with ``seed`` and cut into ``search`` (the first ``search_docs``) and
``heldout`` (the next ``heldout_docs``), disjoint by construction; ``all`` is every document in
lm-eval's order (what ``simple_evaluate`` scores). A task whose few-shot examples come from its
own evaluation documents cannot be a search objective: the shots of a search item could be
held-out items.

The continuous fitness (``score``, in [0, 1]): for multiple choice, the gold choice's probability
under a softmax over the choices' log-likelihoods; for generation, the geometric-mean per-token
probability of the gold answer after the prompt (``exp(loglikelihood / tokens)``); for a single
log-likelihood request, the same of its continuation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.eval.metrics import gold_probability, mean_stderr
from workbench.eval.requests import Request, encode_pairs, encode_texts, move_whitespace
from workbench.errors import WorkbenchError
from workbench.eval.taskfile import HELDOUT_SPLIT, Item, Task, TaskError
from workbench.schema import Field

PREFIX = "lm_eval:"
ALL_SPLIT = "all"
SEARCH_SPLIT = "search"
FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "generate_until")
_lock = threading.Lock()  # lm-eval keeps built requests on the task object


def is_lm_eval(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


@dataclass(frozen=True)
class LmEvalOptions:
    """How lm-eval tasks are found and split (a spec's ``lm_eval:`` mapping, the CLI's options)."""

    include_path: tuple[str, ...] = ()   # directories of the user's own lm-eval task YAMLs
    seed: int = 0                        # the shuffle that cuts search / heldout
    search_docs: int | None = None       # None: half the documents, at most 200
    heldout_docs: int | None = None      # None: the rest, at most 1000
    num_fewshot: int | None = None       # None: as the task defines it (0 when it does not)
    chat_template: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"include_path": list(self.include_path)}

    def relative_to(self, source: str) -> "LmEvalOptions":
        """include_path entries resolved against the spec file that names them (when they exist there)."""
        here = None if source.startswith("<") else Path(source).parent

        def resolve(p: str) -> str:
            path = Path(p).expanduser()
            if not path.is_dir() and here is not None and (here / path).is_dir():
                path = here / path
            return str(path.absolute())  # absolute: a resumed run finds them from anywhere

        return dataclasses.replace(self, include_path=tuple(resolve(p) for p in self.include_path))


def _make_options(include_path: list, **rest) -> LmEvalOptions:
    return LmEvalOptions(tuple(include_path), **rest)


# The `lm_eval:` mapping of a search spec (merge or quantization), checked by `workbench.schema`.
OPTIONS_FIELD = Field(dict, {}, make=_make_options, msg="expected a mapping of lm-eval task options", fields={
    "include_path": Field(list, [], item=str, msg="expected a list of directories of lm-eval task YAMLs"),
    "seed": Field(int, 0),
    "search_docs": Field(int, None, low=1),
    "heldout_docs": Field(int, None, low=1),
    "num_fewshot": Field(int, None, low=0),
    "chat_template": Field(bool, False),
})


@dataclass
class LmEvalUnit:
    """One document: its lm-eval instances and what the workbench scores for them."""

    index: int
    line: int                                   # the document's index in the evaluation documents
    doc: dict
    instances: list                             # lm-eval Instances, in lm-eval's order
    loglik: list = field(default_factory=list)  # (instance position, Request) for loglikelihood instances
    generate: list = field(default_factory=list)  # (instance position, prompt ids, until, max_gen_toks)
    score_request: Any = None                   # the Request whose likelihood is the continuous score
    choices: int = 0                            # multiple choice: the number of choices
    gold: list[int] = field(default_factory=list)

    @property
    def score_rides(self) -> bool:
        """The score request's context is the first generation prompt, so generation scores it in
        that prompt's prefill (``generate_and_score``) instead of a pass of its own."""
        return (bool(self.generate) and self.score_request is not None
                and list(self.score_request.context) == list(self.generate[0][1]))

    @property
    def requests(self) -> list:
        """The requests scored by the log-likelihood pass (a riding score request is not)."""
        out = [r for _, r in self.loglik]
        if self.score_request is not None and not self.score_rides and all(r is not self.score_request for r in out):
            out.append(self.score_request)
        return out


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("lm_eval: tasks named lm_eval:NAME need lm-evaluation-harness: "
                        "pip install 'workbench[lm-eval]'") from None


@contextlib.contextmanager
def _quiet():
    """lm-eval logs per task and draws tqdm bars while building requests; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_MANAGERS: dict[tuple, Any] = {}


def _manager(include_path: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager, one per (include_path, defaults) per process: indexing lm-eval's own
    tasks takes about 10 s here, the user's directory alone a few milliseconds."""
    from lm_eval.tasks import TaskManager

    key = (include_path, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=[str(Path(d).expanduser()) for d in include_path] or None,
                                     include_defaults=defaults, verbosity="ERROR")
    return _MANAGERS[key]


def lm_eval_problem(ref: str, options: LmEvalOptions | None = None) -> str | None:
    """Why ``lm_eval:NAME`` does not load as a task with these options (None: it loads). A spec's
    lm-eval tasks are checked so before any model loads; the first call indexes lm-eval's registry
    (about 10 s) unless the name is in the include path."""
    try:
        load_lm_eval_task(ref, options)
    except WorkbenchError as e:
        return str(e)
    return None


def spec_lm_eval_refs(spec) -> list[tuple[str, str]]:
    """(field, lm_eval:NAME) of every lm-eval task a search spec of either kind names: a merge
    spec's ``objective.I`` and ``report_tasks``, a quantization spec's ``fitness`` and ``heldout_task``."""
    if hasattr(spec, "objective"):
        refs = [(f"objective.{i}", o.task) for i, o in enumerate(spec.objective)]
        refs += [("report_tasks", t) for t in spec.report_tasks]
    else:
        refs = [("fitness", spec.fitness), ("heldout_task", spec.heldout_task)]
    return [(f, r) for f, r in refs if isinstance(r, str) and is_lm_eval(r)]


def check_spec_lm_eval(spec) -> None:
    """Every lm-eval task the spec names loads with its ``lm_eval`` options, checked before any
    model loads: one line naming the spec and the field otherwise."""
    for field_name, ref in spec_lm_eval_refs(spec):
        if (why := lm_eval_problem(ref, spec.lm_eval)) is not None:
            raise TaskError(f"{spec.source}: {field_name}: {why}" if spec.source else f"{field_name}: {why}")


def load_lm_eval_task(ref: str, options: LmEvalOptions | None = None) -> Task:
    """``lm_eval:NAME`` as a :class:`Task` of type ``lm_eval`` with seeded search / heldout splits."""
    opts = options or LmEvalOptions()
    name = ref[len(PREFIX):].strip()
    if not name:
        raise TaskError(f"{ref}: expected lm_eval:TASK_NAME")
    _require_lm_eval()
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        raise TaskError(f"{ref}: num_fewshot: expected an integer >= 0, got {opts.num_fewshot}")
    for d in opts.include_path:
        if not Path(d).expanduser().is_dir():
            raise TaskError(f"include_path: {d} is not a directory of lm-eval task YAMLs")
    with _lock, _quiet():
        manager = _manager(opts.include_path, defaults=False) if opts.include_path else None
        if manager is None or name not in manager.all_tasks:
            manager = _manager(opts.include_path, defaults=True)
        if name not in manager.all_tasks:
            close = list(dict.fromkeys(difflib.get_close_matches(name, manager.all_tasks, n=4, cutoff=0.75) +
                                       [t for t in manager.all_tasks if name.lower() in t.lower()]))[:8]
            hint = f" (similar: {', '.join(close)})" if close else ""
            where = f" or in {', '.join(opts.include_path)}" if opts.include_path else \
                " (a task of your own: give its directory as include_path)"
            raise TaskError(f"{ref}: no lm-eval task {name!r} in lm-eval's registry{where}{hint}")
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as e:  # a dataset that is not on disk, a bad YAML: lm-eval's own message
            raise TaskError(f"{ref}: lm-eval could not load the task: {type(e).__name__}: {e}") from None
    if len(loaded) != 1:
        raise TaskError(f"{ref}: {name!r} is a group of {len(loaded)} lm-eval tasks; name one of them "
                        f"({', '.join(sorted(loaded)[:6])}{', ...' if len(loaded) > 6 else ''})")
    (lm,) = loaded.values()
    out = lm.get_config("output_type")
    if out not in OUTPUT_TYPES:
        raise TaskError(f"{ref}: output_type {out!r} is not supported (expected one of {', '.join(OUTPUT_TYPES)}; "
                        f"for perplexity use a workbench perplexity task)")
    if out == "generate_until":
        gk = lm.get_config("generation_kwargs") or {}
        if gk.get("do_sample") or (gk.get("temperature") or 0) > 0:
            raise TaskError(f"{ref}: generation_kwargs: sampling ({gk}) is not deterministic; the workbench "
                            f"scores greedy generation only")
    if opts.num_fewshot is not None and lm.get_config("num_fewshot") != 0:
        lm.set_config(key="num_fewshot", value=opts.num_fewshot)
    elif lm.get_config("num_fewshot") is None:
        lm.set_config(key="num_fewshot", value=0)
    docs = list(lm.eval_docs)
    n = len(docs)
    if n < 2:
        raise TaskError(f"{ref}: {n} evaluation document(s); a search and a held-out split need at least 2")
    search_n = opts.search_docs if opts.search_docs is not None else min(n // 2, 200)
    held_n = opts.heldout_docs if opts.heldout_docs is not None else min(n - search_n, 1000)
    if search_n < 1 or held_n < 1 or search_n + held_n > n:
        raise TaskError(f"{ref}: search_docs {search_n} + heldout_docs {held_n} must be >= 1 each and fit the "
                        f"task's {n} evaluation documents")
    order = np.random.default_rng(opts.seed).permutation(n).tolist()
    split_of = {i: SEARCH_SPLIT for i in order[:search_n]} | {i: HELDOUT_SPLIT for i in order[search_n:search_n + held_n]}
    items = [Item(split_of[i], i, {"doc_id": i}) for i in sorted(split_of)]
    cfg_path = Path(name)  # names the task in errors (lm-eval keeps no path to its YAML)
    digest = hashlib.sha256(json.dumps({"task": name, "config": lm.dump_config(), "options": opts.to_dict()},
                                       sort_keys=True, default=str).encode())
    for d in docs:
        digest.update(json.dumps(d, sort_keys=True, default=str).encode())
    task = Task(name=ref, type="lm_eval", path=cfg_path, items_path=cfg_path, items=items,
                description=f"lm-eval {name} ({out}, {n} documents)", chat_template=opts.chat_template,
                num_fewshot=int(lm.get_config("num_fewshot") or 0), fingerprint=digest.hexdigest())
    task.source = LmEvalSource(lm, name, out, docs, opts, _fewshot_from_eval_docs(lm))
    return task


@dataclass
class LmEvalSource:
    """The lm-eval side of a task: the lm-eval Task object and its evaluation documents."""

    task: Any
    name: str
    output_type: str
    docs: list
    options: LmEvalOptions
    fewshot_from_eval_docs: bool


def _fewshot_from_eval_docs(lm) -> bool:
    """True when lm-eval would draw this task's few-shot examples from its evaluation documents."""
    if not lm.get_config("num_fewshot"):
        return False
    cfg = getattr(lm, "fewshot_cfg", None)
    split = getattr(cfg, "split", None)
    if getattr(cfg, "samples", None) is not None and split is None:
        return False
    eval_split = lm.config.test_split if lm.has_test_docs() else lm.config.validation_split
    if split is not None:
        return split == eval_split
    if lm.has_training_docs():
        return False
    return not (lm.has_test_docs() and lm.has_validation_docs())


def check_lm_eval_objective(task: Task) -> None:
    """Refuse a task whose search items could see held-out items as few-shot examples."""
    src: LmEvalSource = task.source
    if src.fewshot_from_eval_docs:
        raise TaskError(f"{task.name}: num_fewshot: its {task.num_fewshot} few-shot examples are drawn from the "
                        f"evaluation documents, which also hold the held-out split; give the task a "
                        f"fewshot_split (or num_fewshot: 0) to search on it")


def doc_ids(task: Task, split: str) -> list[int]:
    if split == ALL_SPLIT:
        return list(range(len(task.source.docs)))
    return [it.line for it in task.split_items(split)]


def prepare_lm_eval(task: Task, split: str, tokenizer) -> list[LmEvalUnit]:
    """lm-eval's instances for the split's documents, tokenized as the workbench scores them."""
    src: LmEvalSource = task.source
    lm = src.task
    ids = doc_ids(task, split)
    template = None
    if task.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(f"{task.name}: chat_template: the tokenizer has no chat template")

        def template(history, add_generation_prompt: bool = True) -> str:
            return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=not add_generation_prompt)
    with _lock, _quiet():
        lm.set_fewshot_seed(seed=FEWSHOT_SEED)  # as simple_evaluate does before building requests
        lm.build_all_requests(samples=None if split == ALL_SPLIT else ids, apply_chat_template=task.chat_template,
                              chat_template=template, tokenizer_name=getattr(tokenizer, "name_or_path", ""))
        instances = list(lm.instances)
    by_doc: dict[int, list] = {}
    for inst in instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    units = [LmEvalUnit(k, ids[k], src.docs[ids[k]], sorted(by_doc.get(k, []), key=lambda x: x.idx))
             for k in range(len(ids))]
    pairs, owners, gen_prompts = [], [], []
    delim = lm.get_config("target_delimiter") if lm.get_config("target_delimiter") is not None else " "
    for u in units:
        if not u.instances:
            raise TaskError(f"{task.name}: document {u.line}: lm-eval built no requests for it")
        for pos, inst in enumerate(u.instances):
            if inst.request_type == "loglikelihood":
                ctx, cont = inst.args[0], inst.args[1]
                req = Request(u.index, [], [], *move_whitespace(ctx, cont))
                u.loglik.append((pos, req))
                pairs.append((ctx, cont))
                owners.append(req)
            elif inst.request_type == "generate_until":
                gk = dict(inst.args[1] or {})
                until = gk.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                u.generate.append([pos, None, until, int(gk.get("max_gen_toks", 256))])   # prompt ids below
                gen_prompts.append((u.generate[-1], inst.args[0]))
            else:
                raise TaskError(f"{task.name}: request type {inst.request_type!r} is not supported")
        if src.output_type == "multiple_choice":
            choices = lm.doc_to_choice(u.doc)
            u.choices = len(choices)
            u.gold = _gold_indices(lm.doc_to_target(u.doc), choices)
        elif src.output_type == "loglikelihood":
            u.score_request = u.loglik[0][1]
        else:  # generate_until: the gold answer's likelihood after the prompt
            ctx = u.instances[0].args[0]
            target = _target_text(lm, u.doc)
            u.score_request = Request(u.index, [], [], *move_whitespace(ctx, delim + target))
            pairs.append((ctx, delim + target))
            owners.append(u.score_request)
    encoded, _ = encode_pairs(tokenizer, pairs)
    for req, (c, k) in zip(owners, encoded):
        req.context, req.continuation = c, k
    for (entry, _), prompt_ids in zip(gen_prompts, encode_texts(tokenizer, [p for _, p in gen_prompts])):
        entry[1] = prompt_ids
    return units


def _gold_indices(target: Any, choices: Sequence[str]) -> list[int]:
    golds = target if isinstance(target, list) else [target]
    out = []
    for g in golds:
        if isinstance(g, str):
            if g not in choices:
                continue
            g = list(choices).index(g)
        if isinstance(g, (int, np.integer)) and 0 <= int(g) < len(choices):
            out.append(int(g))
    return out


def _target_text(lm, doc: dict) -> str:
    t = lm.doc_to_target(doc)
    if isinstance(t, list):
        t = t[0] if t else ""
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool) and lm.config.doc_to_choice is not None:
        t = lm.doc_to_choice(doc)[int(t)]
    return str(t)


def score_lm_eval_units(task: Task, part: list[LmEvalUnit], loglik: Callable, generate: Callable,
                        log_samples: bool, samples: list) -> list[dict]:
    """Score ``part``: ``loglik(requests)`` gives per-token (logprob, greedy) arrays, ``generate(prompts,
    max_new_tokens, stop, continuations)`` greedy texts and the continuations' arrays (None where none). Returns one record per document: lm-eval's metric values
    (``metric,filter`` keys, ``,none`` dropped), ``score`` and ``unit`` (the continuous fitness)."""
    lm = task.source.task
    reqs = [r for u in part for r in u.requests]
    values = loglik(reqs) if reqs else []
    by_req = {id(r): v for r, v in zip(reqs, values)}
    gens: dict[tuple[int, int], str] = {}
    groups: dict[tuple, list] = {}
    for u in part:
        for j, (pos, prompt, until, max_toks) in enumerate(u.generate):
            ride = u.score_request if j == 0 and u.score_rides else None
            groups.setdefault((tuple(until), max_toks), []).append((u, j, prompt, ride))
    for (until, max_toks), members in groups.items():
        texts, scored = generate([m[2] for m in members], max_toks, list(until),
                                 [m[3].continuation if m[3] is not None else None for m in members])
        for (u, j, _, ride), text, v in zip(members, texts, scored):
            gens[(u.index, j)] = text
            if ride is not None:
                by_req[id(ride)] = v
    records = []
    for u in part:
        copies = [dataclasses.replace(inst, resps=[], filtered_resps={}) for inst in u.instances]
        for pos, r in u.loglik:
            v = by_req[id(r)]
            copies[pos].resps.append((float(v[:, 0].sum()), bool(v[:, 1].all())))
        for j, (pos, *_rest) in enumerate(u.generate):
            copies[pos].resps.append(gens[(u.index, j)])
        for f in lm._filters:
            f.apply(copies)
        rec: dict[str, float] = {}
        for key in copies[0].filtered_resps:
            metrics = lm.process_results(u.doc, [c.filtered_resps[key] for c in copies])
            for m, val in metrics.items():
                rec[m if key == "none" else f"{m},{key}"] = val
        score = _continuous_score(u, by_req, task.source.output_type, copies)
        rec["score"] = rec["unit"] = score
        records.append(rec)
        if log_samples:
            samples.append({"task": task.name, "doc_id": u.line,
                            "arguments": [list(c.args) if isinstance(c.args[-1], str) else [c.args[0]] for c in copies],
                            "resps": [c.resps for c in copies],
                            "filtered_resps": {k: [c.filtered_resps[k] for c in copies] for k in copies[0].filtered_resps},
                            **{k: _plain(v) for k, v in rec.items() if k != "unit"}})
    return records


def _plain(v: Any) -> Any:
    return float(v) if isinstance(v, (np.floating, np.integer, bool)) else v


def _continuous_score(u: LmEvalUnit, by_req: dict, output_type: str, copies: list) -> float:
    if output_type == "multiple_choice":
        lls = [c.resps[0][0] for c in copies[:u.choices]]
        return max((gold_probability(lls, g) for g in u.gold), default=0.0)
    v = by_req[id(u.score_request)]
    return math.exp(float(v[:, 0].mean()))


def aggregate_lm_eval(task: Task, records: list[dict]) -> tuple[dict, dict]:
    """lm-eval's aggregation of each metric (with its mean's standard error where the aggregation is a
    mean), plus the continuous ``score``."""
    from lm_eval.api.metrics import mean as lm_mean

    agg = task.source.task.aggregation()
    metrics, stderr = {}, {}
    for key in records[0]:
        if key == "unit":
            continue
        vals = [r[key] for r in records if key in r]
        if key == "score":
            metrics[key], stderr[key] = mean_stderr(vals)
            continue
        fn = agg.get(key.split(",")[0])
        if fn is None:
            continue
        metrics[key] = float(fn(vals))
        stderr[key] = mean_stderr([float(v) for v in vals])[1] if fn is lm_mean else math.nan
    return metrics, stderr
