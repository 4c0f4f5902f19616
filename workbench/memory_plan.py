"""Memory plans: the bytes a search, a merge or a recovery will need on each device, from headers.

Every figure comes from safetensors headers and configs (shapes and dtypes), so a plan is made,
and a run that cannot fit refused, before any tensor is read. A plan lists what a run adds to its
process (the interpreter, torch and transformers are already there, and so already outside the
device's free memory): the tensors it keeps (sources, the resident model, caches) and the largest
of its transient phases (merging one tensor, a batch's logits, the KL teacher's first pass), which
never overlap. Per-method merge temporaries are measured: a 16M-entry float32 input, peak RSS growth
over the inputs, in units of one input tensor (output included): task_arithmetic 1.1-1.2, TIES and
DARE 1.9-2.7 for 1-3 models, Breadcrumbs 2.1-3.2, DELLA 9-10.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

SKIP_ENV = "WORKBENCH_NO_PLAN_CHECK"   # =1: run even when the plan says it will not fit
SORTED_CACHE_CAP = 8 * 2**30
HEAD_SLICE = 2048           # workbench.eval.scoring: scored positions per output-projection call
MAX_BATCH_TOKENS = 16384    # workbench.eval.evaluator.evaluate's default
PREFETCH_BYTES = 64 * 2**20  # workbench.merge.executor: the next tensor's inputs are read ahead up to this
CUDA_CONTEXT = 512 * 2**20  # a process's CUDA context and kernels, before any tensor
WORKER_STATE = 48 * 2**20   # a search worker's tokenizer, evaluator state and allocator slack (measured 43-46 MB)
WORKER_RUNTIME = 400 * 2**20  # a spawned worker's interpreter + torch + transformers (RSS, measured ~380 MB)
# merge work per output tensor, in input tensors of the compute dtype (output included): a + b * models
# besides the base; fitted to the measurements above (16M entries, 1-3 models besides the base)
METHOD_WORK = {"linear": (1.1, 0.05), "task_arithmetic": (1.1, 0.03), "slerp": (1.1, 0.0), "nuslerp": (1.5, 0.0),
               "multislerp": (1.5, 0.2), "ties": (1.6, 0.35), "dare_ties": (1.4, 0.45), "dare_linear": (1.0, 0.5),
               "breadcrumbs": (1.7, 0.45), "breadcrumbs_ties": (1.9, 0.4), "della": (8.7, 0.4),
               "della_linear": (8.7, 0.4), "passthrough": (1.0, 0.0)}
DEFAULT_WORK = (2.0, 0.5)


class MemoryPlanError(WorkbenchError):
    """A run that will not fit in its device's memory; the message holds the plan and a suggestion."""


# --- devices ---------------------------------------------------------------------------------

def free_bytes(device: str | torch.device) -> int:
    """Memory free for new tensors on ``device``: CUDA's ``mem_get_info``; on the CPU the kernel's
    MemAvailable (free plus reclaimable page cache), else physical RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def sorted_cache_budget(free: int) -> int:
    """Bytes the sorted-magnitude cache may take, given the free memory of the device it lives on
    once sources and model are in place: a quarter of it (the rest for scoring), at most 8 GiB."""
    return max(0, min(SORTED_CACHE_CAP, free // 4))


def default_source_dtype(device: str | torch.device) -> str:
    """The search's source dtype when the spec names none: bfloat16 on a GPU (three 7B sources are
    42 GB instead of 84), float32 on the CPU (as before; numpy sorts float32 12x faster)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def device_name(device: str | torch.device) -> str:
    d = torch.device(device)
    return f"cuda:{d.index or 0}" if d.type == "cuda" else d.type


# --- plans -----------------------------------------------------------------------------------

@dataclass
class Need:
    device: str
    what: str
    nbytes: int
    transient: bool = False   # one phase of several: only the largest transient need of a device counts
    group: str = ""           # workers running side by side (combine_plans): their transient needs add up


@dataclass
class Plan:
    title: str
    needs: list[Need]
    free: dict[str, int]               # device -> free bytes
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)

    def devices(self) -> list[str]:
        return list(dict.fromkeys([n.device for n in self.needs] + list(self.free)))

    def total(self, device: str) -> int:
        mine = [n for n in self.needs if n.device == device]
        groups = {n.group for n in mine if n.transient}
        return (sum(n.nbytes for n in mine if not n.transient)
                + sum(max(n.nbytes for n in mine if n.transient and n.group == g) for g in groups))

    def short(self) -> list[str]:
        """Devices whose need passes their free memory."""
        return [d for d in self.devices() if self.total(d) > self.free.get(d, math.inf)]

    def fits(self) -> bool:
        return not self.short()

    def table(self) -> str:
        lines = [f"memory plan: {self.title}"]
        for d in self.devices():
            lines.append(f"  {d}:")
            for n in (n for n in self.needs if n.device == d):
                lines.append(f"    {n.what:<64} {fmt_bytes(n.nbytes):>10}" + ("  (transient)" if n.transient else ""))
            free = self.free.get(d)
            verdict = "" if free is None else ("  fits" if self.total(d) <= free else "  DOES NOT FIT")
            lines.append(f"    {'total (the largest transient need of each worker counts)':<64} {fmt_bytes(self.total(d)):>10}")
            lines.append(f"    {'free':<64} {fmt_bytes(free) if free is not None else '?':>10}{verdict}")
        lines += [f"  {n}" for n in self.notes]
        if self.suggestion and not self.fits():
            lines.append(f"  would fit: {self.suggestion}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`MemoryPlanError` (the table and the suggestion) when it does not fit,
        unless ``WORKBENCH_NO_PLAN_CHECK=1``."""
        if self.fits() or os.environ.get(SKIP_ENV) == "1":
            return
        short = ", ".join(f"{d} needs {fmt_bytes(self.total(d))}, has {fmt_bytes(self.free[d])} free"
                          for d in self.short())
        raise MemoryPlanError(f"{self.title}: will not fit in memory ({short}); nothing was loaded. "
                              f"{'Would fit: ' + self.suggestion + '. ' if self.suggestion else ''}"
                              f"Set {SKIP_ENV}=1 to run anyway.\n{self.table()}")


def combine_plans(plans: list[Plan]) -> Plan:
    """One plan of several (workers on several GPUs, running side by side): every need, the free
    memory of each device; on a device they share (the host), each plan's largest transient need
    adds to the others'. The first suggestion of a plan that does not fit."""
    if len(plans) == 1:
        return plans[0]
    free = {d: f for p in plans for d, f in p.free.items()}
    needs = [dataclasses.replace(n, group=f"{i}:{n.group}") for i, p in enumerate(plans) for n in p.needs]
    combined = Plan(" + ".join(p.title for p in plans), needs, free,
                    notes=list(dict.fromkeys(n for p in plans for n in p.notes)))
    if not combined.fits():
        combined.suggestion = next((p.suggestion for p in plans if not p.fits() and p.suggestion), None)
    return combined


def fmt_bytes(n: int | float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _itemsize(dtype: str | torch.dtype) -> int:
    return (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize


def _free_of(devices: list[str], free: dict[str, int] | None) -> dict[str, int]:
    return {d: (free[d] if free and d in free else free_bytes(d)) for d in devices}


# --- merge work, shared by the search and the merge plans ----------------------------------------

def merge_work_bytes(method: str, n_others: int, numel: int, compute_itemsize: int) -> int:
    """Transient bytes of merging one tensor (temporaries and the output) beyond its inputs;
    ``n_others``: the inputs besides the base."""
    a, b = METHOD_WORK.get(method, DEFAULT_WORK)
    return int((a + b * n_others) * numel * compute_itemsize)


def _job_refs(job) -> list[tuple[int, str]]:
    return ([job.base] if job.base else []) + list(job.others)


# --- the search ------------------------------------------------------------------------------

def search_plan(spec, device: str | torch.device = "cpu", workers: int = 1, *, sorted_cache: bool | None = None,
                offload_sources: bool | None = None, source_dtype: str | None = None,
                free: dict[str, int] | None = None, runtime: bool = False) -> Plan:
    """What a merge search of ``spec`` needs with ``workers`` workers sharing ``device`` (1 for
    the local backend). ``sorted_cache`` / ``offload_sources`` / ``source_dtype`` default to the
    spec's; ``free`` overrides measured free memory per device; ``runtime`` adds each spawned
    worker's interpreter (processes backend). Opens the models' headers only."""
    from workbench.merge.plan import plan_merge
    from workbench.search.genome import GenomeLayout

    dev = device_name(device)
    sorted_cache = getattr(spec, "sorted_cache", True) if sorted_cache is None else sorted_cache
    offload = getattr(spec, "offload_sources", False) if offload_sources is None else offload_sources
    src_dtype = source_dtype or spec.dtype or default_source_dtype(dev)
    probe = GenomeLayout(spec, 1)
    plan = plan_merge(probe.to_recipe(probe.start()))
    try:
        layout = GenomeLayout(spec, plan.num_layers)
        plan.close()
        plan = plan_merge(layout.to_recipe(layout.start()))
        shapes = _search_shapes(plan)
        ref = plan.models[plan.reference_model]
        model_numel = sum(_numel(ref.shape(n)) for n in ref.tensor_names())
        config = dict(ref.config)
        method = plan.method
    finally:
        plan.close()
    compute = 8 if src_dtype == "float64" else 4
    src_size, eval_size = _itemsize(src_dtype), _itemsize(spec.eval_dtype)
    src_dev = "cpu" if offload else dev
    w = max(1, workers)
    times = f" x {w} workers" if w > 1 else ""
    sources = sum(_numel(s) for s in shapes["sources"].values()) * src_size
    model = model_numel * eval_size
    needs = [Need(src_dev, f"sources ({len(shapes['models'])} models, {src_dtype}){times}", sources * w),
             Need(dev, f"resident model ({spec.eval_dtype}){times}", model * w)]
    needs.append(Need("cpu", f"tokenizer, evaluator state{times}", WORKER_STATE * w))
    if runtime and w > 1:
        needs.append(Need("cpu", f"worker processes (interpreter, torch){times}", WORKER_RUNTIME * w))
    if dev.startswith("cuda"):
        needs.append(Need(dev, f"CUDA context{times}", CUDA_CONTEXT * w))
    free_now = _free_of(list(dict.fromkeys([dev, src_dev, "cpu"])), free)
    caching = bool(sorted_cache and method.ranks_magnitudes and shapes["deltas"])
    if caching:
        full = sum(_numel(s) for s in shapes["deltas"]) * compute
        left = free_now[dev] // w - model - (sources if src_dev == dev else 0)
        cached = min(full, sorted_cache_budget(left))
        needs.append(Need(dev, f"sorted-magnitude cache (of {fmt_bytes(full)}; a quarter of free){times}",
                          cached * w))
    # merging one tensor: its inputs in the compute dtype (copies unless already held so) and the work
    biggest = max(shapes["jobs"], key=lambda j: _numel(j[0]) * (j[1] + 1), default=((0,), 0, 0))
    numel, n_in, n_others = _numel(biggest[0]), biggest[1], biggest[2]
    copies = 0 if (src_size == compute and not offload) else n_in * numel * compute
    copies += 2 * numel * compute if caching else 0   # a delta's magnitudes and their sorted copy
    needs.append(Need(dev, f"merging one tensor ({method.name}, {n_in} inputs){times}",
                      (copies + merge_work_bytes(method.name, n_others, numel, compute)) * w, transient=True))
    for what, nbytes, where in _evaluator_needs(spec, config, eval_size, dev):
        needs.append(Need(where, what + times, nbytes * w, transient=True))
    notes = [f"sources are held in {src_dtype} and merged per tensor in float{compute * 8}"]
    p = Plan(f"search {spec.name} on {dev}", needs, _free_of([n.device for n in needs], free), notes=notes)
    if not p.fits():
        p.suggestion = _search_suggestion(spec, dev, w, src_dtype, sorted_cache, offload, free, runtime)
    return p


def _search_shapes(plan) -> dict:
    """Per unique held source tensor its shape; per job (shape, inputs); the deltas a magnitude
    cache would sort; the models."""
    sources, jobs, deltas = {}, [], []
    for job in plan.jobs:
        refs = _job_refs(job)
        for m, name in refs:
            sources[(plan.models[m].source_id, name)] = plan.models[m].shape(name)
        jobs.append((job.shape, len(refs), len(job.others)))
        if job.base:
            deltas += [plan.models[m].shape(name) for m, name in job.others]
    return {"sources": sources, "jobs": jobs, "deltas": deltas, "models": {sid for sid, _ in sources}}


def _evaluator_needs(spec, config: dict, eval_size: int, dev: str) -> list[tuple[str, int, str]]:
    """Scoring buffers per task (the largest counts) and the KL teacher's first pass (on the CPU:
    `workbench.eval.kl.teacher_topk` loads the reference in float32 there)."""
    from workbench.eval.taskfile import load_task

    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    inter = int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 0)
    names = [o.task for o in spec.objective] + list(spec.report_tasks)
    worst, teacher = 0, []
    for name in dict.fromkeys(names):
        try:
            task = load_task(name, spec.lm_eval)
        except WorkbenchError:
            continue   # the objective reports it; the plan does without
        worst = max(worst, _scoring_bytes(task, spec.batch_size, hidden, inter, vocab, eval_size))
        if task.type == "kl" and task.reference:
            teacher.append(task)
    out = [(f"scoring a batch (logits of {HEAD_SLICE} x {vocab} at most, activations)", worst, dev)] if worst else []
    for task in teacher:
        out.append((f"KL teacher {task.name}: first pass, unless its top-k is cached", _teacher_bytes(task, spec),
                    "cpu"))
    return out


def _batch_tokens(task, batch_size: int) -> tuple[int, int, int]:
    """(padded tokens, rows, scored positions) of the largest batch the evaluator builds for ``task``.
    Windowed tasks from their header; others from their items' lengths (3 characters a token at
    least: an upper bound for BPE English), the whole width for lm-eval tasks."""
    if task.type in ("perplexity", "kl"):
        width = task.max_length
        total = task.max_tokens or batch_size * width
        rows = max(1, min(batch_size, MAX_BATCH_TOKENS // width, math.ceil(total / width)))
        return rows * width, rows, min(HEAD_SLICE, rows * width)
    if task.type == "lm_eval" or not task.items:
        width, cont, requests = min(task.max_length, 512), 32, batch_size
    else:
        ctx = cont = 0
        requests = 0
        for it in task.items:
            d = it.data
            ctx = max(ctx, len(str(d.get("context", d.get("prompt", d.get("text", ""))))))
            outs = d.get("choices") or d.get("answers") or [d.get("continuation", d.get("answer", ""))]
            cont = max(cont, *(len(str(c)) for c in outs))
            requests += len(outs)
        cont = cont // 3 + 2 + (task.max_new_tokens if task.type == "exact_match" else 0)
        width = min(task.max_length, (ctx + task.num_fewshot * (ctx + cont * 3)) // 3 + 2 + cont)
    rows = max(1, min(batch_size, MAX_BATCH_TOKENS // max(1, width), requests))
    return rows * width, rows, min(HEAD_SLICE, rows * cont)


def _scoring_bytes(task, batch_size: int, hidden: int, inter: int, vocab: int, eval_size: int,
                   logit_bytes: int | None = None) -> int:
    """A batch's logits (``logit_bytes`` per logit: by default the head's output, its float32 copy
    and the log-softmax) and one layer's activations."""
    tokens, rows, scored = _batch_tokens(task, batch_size)
    width = tokens // rows
    logits = scored * vocab * (logit_bytes or eval_size + 4 + 4)
    activations = tokens * (6 * hidden + 3 * inter) * eval_size + rows * width * width * eval_size
    return logits + activations


def _teacher_bytes(task, spec) -> int:
    from workbench.models.checkpoint import ModelDir
    from workbench.models.loader import resolve_model

    try:
        ref = ModelDir(resolve_model(task.reference))
    except WorkbenchError:
        return 0
    numel = sum(_numel(ref.shape(n)) for n in ref.tensor_names())
    text = ref.config.get("text_config", ref.config)
    hidden = int(text.get("hidden_size") or 0)
    inter = int(text.get("intermediate_size") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 0)
    ref.close()
    positions = task.max_tokens or spec.batch_size * task.max_length
    cache = positions * (task.top_k * 8 + 4)
    # float32 logits, log-softmax and the top-k reducer's tail-mass temporaries: about five copies
    # (SmolLM2, 1024 positions: the first pass's peak 1.57 GB over the resident search)
    return numel * 4 + _scoring_bytes(task, spec.batch_size, hidden, inter, vocab, 4, logit_bytes=20) + cache


def _search_suggestion(spec, dev, workers, src_dtype, sorted_cache, offload, free, runtime) -> str | None:
    """The first single setting (else pair) that makes the search fit."""
    tries = []
    if _itemsize(src_dtype) > 2:
        tries.append(("spec `dtype: bfloat16` (sources in bfloat16)", {"source_dtype": "bfloat16"}))
    if sorted_cache:
        tries.append(("spec `sorted_cache: false`", {"sorted_cache": False}))
    for k in range(workers - 1, 0, -1):
        tries.append((f"--workers {k}", {"workers": k}))
    if dev != "cpu" and not offload:
        tries.append(("spec `offload_sources: true` (sources in host RAM)", {"offload_sources": True}))
    base = {"workers": workers, "sorted_cache": sorted_cache, "offload_sources": offload, "source_dtype": src_dtype}
    combos = [(w, o) for w, o in tries] + [(f"{a} and {b}", {**oa, **ob}) for i, (a, oa) in enumerate(tries)
                                            for b, ob in tries[i + 1:] if set(oa) != set(ob)]
    for words, change in combos:
        opts = {**base, **change}
        if search_plan(spec, dev, opts.pop("workers"), free=free, runtime=runtime, **opts).fits():
            return words
    return None


# --- a merge ---------------------------------------------------------------------------------

def merge_plan(recipe, device: str | torch.device = "cpu", *, out_dtype: str | None = None,
               free: dict[str, int] | None = None) -> Plan:
    """What `workbench merge` of ``recipe`` (a Recipe or a MergePlan) needs on ``device``: the
    streaming executor holds one tensor's inputs, the next one's read ahead (when under 64 MiB),
    the merge's work and output, and the previous output being written."""
    from workbench.merge.plan import MergePlan, plan_merge

    own = not isinstance(recipe, MergePlan)
    plan = plan_merge(recipe) if own else recipe
    try:
        dev = device_name(device)
        compute = plan.compute_dtype().itemsize
        out_size = plan.output_dtype(out_dtype).itemsize
        rows = []   # per job: (inputs in compute dtype, bytes as stored, numel, inputs besides the base)
        for job in plan.jobs:
            refs = _job_refs(job)
            numel = _numel(job.shape)
            stored = sum(_numel(plan.models[m].shape(n)) * plan.models[m].dtype(n).itemsize for m, n in refs)
            rows.append((len(refs) * numel * compute, stored, numel, len(job.others)))
        name = plan.method.name
    finally:
        if own:
            plan.close()
    peak, host_peak, at = 0, 0, 0
    for i, (inputs, stored, numel, n) in enumerate(rows):
        ahead = rows[i + 1][0] if i + 1 < len(rows) and rows[i + 1][1] <= PREFETCH_BYTES else 0
        cast = numel * out_size if out_size != compute else 0
        writing = rows[i - 1][2] * out_size if i else 0
        total = inputs + ahead + merge_work_bytes(name, n, numel, compute) + cast + writing
        if total > peak:
            peak, at = total, i
        if dev != "cpu":   # file pages mapped while an input is copied over, and the output's host copy
            host_peak = max(host_peak, stored + numel * out_size)
    needs = [Need(dev, f"one tensor's inputs, the next ones read ahead, {name} work, output", peak)]
    if dev != "cpu":
        needs += [Need("cpu", "mapped input pages and the output's host copy", host_peak),
                  Need(dev, "CUDA context", CUDA_CONTEXT)]
    p = Plan(f"merge ({name}) on {dev}", needs, _free_of([n.device for n in needs], free))
    if not p.fits():
        p.suggestion = "--device cpu" if dev != "cpu" and _free_of(["cpu"], free)["cpu"] >= peak else None
    return p


# --- a recovery ------------------------------------------------------------------------------

def recovery_plan(qdir: str | Path, teacher: str | Path, opts, device: str | torch.device = "cpu", *,
                  free: dict[str, int] | None = None) -> Plan:
    """What `workbench recover QDIR --teacher T` needs (``opts``: a RecoverOptions): the student
    (its stored tensors, float16 ones as float32), the float32 teacher, the teacher's top-k cache,
    the trainable parameters with their gradients and AdamW's two moments, and one end-to-end
    step's activations (autograd keeps every layer's)."""
    import json

    from workbench.models.checkpoint import ModelDir
    from workbench.models.loader import resolve_model
    from workbench.models.safetensors_io import SafetensorsFile
    from workbench.quant.model import read_quant_meta

    dev = device_name(device)
    qdir = Path(qdir)
    st = SafetensorsFile(qdir / "model.safetensors")
    try:
        student, trainable = 0, 0
        leaves = (".lora_A", ".lora_B") + ((".scale", ".zero") if opts.scale_lr > 0 else ())
        for name in st.keys():
            numel, dtype = _numel(st.shape(name)), st.dtype(name)
            student += numel * (4 if dtype == torch.float16 else dtype.itemsize)   # float16 loads as float32
            if name.endswith(leaves):
                trainable += numel
    finally:
        st.close()
    weights = sum(e["in_features"] * e["out_features"] for e in read_quant_meta(qdir)["layers"].values())
    t = ModelDir(resolve_model(teacher))
    teacher_bytes = sum(_numel(t.shape(n)) for n in t.tensor_names()) * 4
    t.close()
    config = json.loads((qdir / "config.json").read_text())
    text = config.get("text_config", config)
    hidden, vocab = int(text.get("hidden_size") or 0), int(text.get("vocab_size") or 0)
    inter = int(text.get("intermediate_size") or 4 * hidden)
    layers = int(text.get("num_hidden_layers") or 0)
    windows = max(1, opts.max_tokens // opts.seq_len)
    cache = windows * opts.seq_len * (opts.top_k * (4 + 8) + 4)   # float32 log-probs, int64 ids, the tail
    tokens = opts.batch_size * opts.seq_len
    act_size = 2 if opts.dtype == "bfloat16" else 4
    activations = (tokens * layers * (10 * hidden + 4 * inter) * act_size    # kept for backward
                   + weights * act_size                                     # dequantized weights, kept too
                   # logits and their float32 softmaxes, forward and backward: ~24 bytes a logit besides
                   # the head's output (fitted to two measured runs, 2 x 128 tokens: a 44 MB Llama of
                   # vocabulary 16384, 257 MB peak growth; a 63 MB one of 49152, 436 MB)
                   + tokens * vocab * (act_size + 24))
    needs = [Need(dev, "student (quantized, adapters)", student),
             Need(dev, "unpacked codes while training", weights),
             Need(dev, "teacher (float32)", teacher_bytes),
             Need(dev, f"teacher top-k cache ({windows} windows x {opts.seq_len}, k={opts.top_k})", cache),
             Need(dev, "trainable parameters, gradients, AdamW moments", trainable * 16),
             Need(dev, f"one step's activations ({opts.batch_size} x {opts.seq_len}, {opts.dtype})", activations,
                  transient=True)]
    if dev != "cpu":
        needs.append(Need(dev, "CUDA context", CUDA_CONTEXT))
    p = Plan(f"recover {qdir.name} on {dev}", needs, _free_of([dev], free))
    if not p.fits() and opts.batch_size > 1:
        from dataclasses import replace

        if recovery_plan(qdir, teacher, replace(opts, batch_size=1), device, free=p.free).fits():
            p.suggestion = "--batch-size 1 (fewer activations)"
    return p
