"""The streaming executor: merge tensor by tensor and write shards as results arrive.

Peak memory stays near the tensors in flight (the inputs of one output tensor, plus the next
one's being read ahead), never the sum of the models. The output directory is built in a
temporary directory and renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import json
import re
import resource
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.atomic import atomic_dir
from workbench.errors import WorkbenchError
from workbench.merge.card import write_model_card
from workbench.merge.plan import MergePlan, TensorJob, plan_merge
from workbench.merge.recipe import dump_recipe, load_recipe
from workbench.merge.tokenizer import write_tokenizer
from workbench.models.safetensors_io import StreamingShardWriter, dtype_size

PREFETCH_BYTES = 64 * 2**20  # read the next tensor's inputs ahead only when they are this small or smaller
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    bytes_written: int
    peak_rss_bytes: int
    num_tensors: int
    num_shards: int


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise WorkbenchError(f"--shard-size: cannot read {text!r}; expected e.g. 500MB, 2GB or a byte count")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). ``ru_maxrss`` is not used: a process started by a
    large parent inherits the parent's figure there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def keep_freed_memory() -> None:
    """Ask glibc to keep freed tensor memory for reuse instead of returning it to the OS: otherwise
    every merged tensor and temporary is page-faulted in afresh (inputs are file mappings, not
    heap). Peak memory is unchanged: the next tensors reuse the same blocks; the process keeps it
    until it ends. A no-op where glibc is not the C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 34)    # M_TRIM_THRESHOLD: do not give the top of the heap back
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: glibc's maximum; bigger blocks stay mmapped
    except (OSError, AttributeError):
        pass


def check_device(device: str) -> torch.device:
    from workbench.devices import resolve_device

    return resolve_device(device)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random masks do not depend on the order tensors are merged in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge_tensor(plan: MergePlan, job: TensorJob, inputs: tuple[torch.Tensor | None, list[torch.Tensor]],
                 device: torch.device, seed: int) -> torch.Tensor:
    """The merged tensor of ``job``; random methods draw from a CPU generator seeded by (seed, name),
    so the result does not depend on ``device`` (where the inputs lie)."""
    base, others = inputs
    if plan.method.random:
        job.params.generator = torch.Generator().manual_seed(tensor_seed(seed, job.out_name))
    out = plan.method.fn(base, others, job.params)
    job.params.generator = None
    if tuple(out.shape) != job.shape:
        raise WorkbenchError(f"{plan.method.name} returned shape {list(out.shape)} for {job.out_name}, "
                             f"expected {list(job.shape)}")
    return out


class NonFiniteError(WorkbenchError):
    """A merge input (or result) holding NaN or inf; the message names the model and tensor."""


def check_finite(plan: MergePlan, job: TensorJob, inputs: tuple[torch.Tensor | None, list[torch.Tensor]],
                 merged: torch.Tensor) -> None:
    """Refuse a merged tensor that holds NaN/inf, naming the input model and tensor it came from.

    One reduction over the result instead of a pass over every input: every merge method carries
    a non-finite input entry into its result (masks multiply, so NaN * 0 stays NaN; slerp-like
    methods spread it through their norms); ``tests/test_input_checks.py`` holds each method to
    that. A sum is non-finite if any entry is, or if it overflows: then the entries are counted."""
    if bool(torch.isfinite(merged.sum())):
        return
    n_out = count_nonfinite(merged)
    if not n_out:   # the sum overflowed
        return
    base, others = inputs
    found = [(plan.model_refs[m], name, n)
             for (m, name), t in zip(([job.base] if job.base else []) + job.others,
                                     ([base] if job.base else []) + others)
             if (n := count_nonfinite(t))]
    if not found:
        raise NonFiniteError(f"tensor {job.out_name!r}: the {plan.method.name} merge made {n_out} non-finite "
                             "values (NaN/inf) from finite inputs; pass --allow-nonfinite to write them anyway")
    (model, name, n), *more = found
    also = "".join(f"; model {m!r} too ({k} in {t!r})" for m, t, k in more)
    raise NonFiniteError(f"model {model!r}: tensor {name!r} holds {n} non-finite values (NaN/inf){also}; "
                         "pass --allow-nonfinite to merge anyway")


def count_nonfinite(t: torch.Tensor) -> int:
    return t.numel() - int(torch.isfinite(t).sum()) if t.is_floating_point() else 0


def input_bytes(plan: MergePlan, job: TensorJob) -> int:
    refs = ([job.base] if job.base else []) + job.others
    total = 0
    for model, name in refs:
        n = plan.models[model].dtype(name).itemsize
        for d in plan.models[model].shape(name):
            n *= d
        total += n
    return total


def read_inputs(plan: MergePlan, job: TensorJob, device: torch.device, dtype: torch.dtype):
    def load(ref):
        model, name = ref
        return plan.models[model].get_tensor(name).to(device=device, dtype=dtype)

    return (load(job.base) if job.base else None), [load(r) for r in job.others]


def assign_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> list[list]:
    shards, current, size = [], [], 0
    for spec in specs:
        n = dtype_size(spec[1])
        for d in spec[2]:
            n *= d
        if current and size + n > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    return shards + [current] if current else shards


def execute_merge(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu", out_dtype: str | None = None,
                  shard_size: int | str = "2GB", seed: int = 0, overwrite: bool = False,
                  on_tensor: Callable[[int, int, str], None] | None = None,
                  allow_nonfinite: bool = False) -> MergeResult:
    """Run a planned merge into ``out_dir``. ``on_tensor(done, total, name)`` reports progress.
    A NaN/inf in an input stops the merge, naming the model and tensor (nothing is written),
    unless ``allow_nonfinite``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WorkbenchError(f"{out_dir} already exists; choose another output or pass --overwrite")
    dev = check_device(device)
    dtype_out = plan.output_dtype(out_dtype)
    compute = plan.compute_dtype()
    specs = [(job.out_name, dtype_out, job.shape) for job in plan.jobs]
    shards, names, shard_of = shard_layout(specs, parse_size(shard_size))

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writers = [StreamingShardWriter(tmp / n, shard) for n, shard in zip(names, shards)]
        try:
            # read the next tensor's inputs in a thread while this one is merged, unless they are
            # big: then memory matters more than the overlap; the previous result is written by
            # another thread meanwhile (file writes release the GIL), one tensor at a time
            with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
                pending = written = None
                for i, job in enumerate(plan.jobs):
                    inputs = pending.result() if pending else read_inputs(plan, job, dev, compute)
                    pending = None
                    if i + 1 < len(plan.jobs) and input_bytes(plan, plan.jobs[i + 1]) <= PREFETCH_BYTES:
                        pending = reader.submit(read_inputs, plan, plan.jobs[i + 1], dev, compute)
                    out = merge_tensor(plan, job, inputs, dev, seed)
                    if not allow_nonfinite:
                        check_finite(plan, job, inputs, out)
                    out = out.to(dtype_out)
                    del inputs
                    if written is not None:
                        written.result()
                    written = writer.submit(writers[shard_of[job.out_name]].write, job.out_name, out)
                    del out
                    if on_tensor:
                        on_tensor(i + 1, len(plan.jobs), job.out_name)
                if written is not None:
                    written.result()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        total_bytes = close_shards(writers, names, shard_of, [n for n, _, _ in specs], tmp)
        write_output_files(plan, tmp, dtype_out, seed, out_dir.name)

    return MergeResult(out_dir=out_dir, seconds=time.perf_counter() - start, bytes_written=total_bytes,
                       peak_rss_bytes=peak_rss_bytes(),
                       num_tensors=len(plan.jobs), num_shards=len(shards))


def shard_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int):
    """(shards, their file names, tensor name -> shard index) for tensors written in ``specs`` order."""
    shards = assign_shards(specs, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    return shards, names, {spec[0]: i for i, shard in enumerate(shards) for spec in shard}


def close_shards(writers: list, names: list[str], shard_of: dict[str, int], order: list[str], out: Path) -> int:
    """Close every shard writer and, past one shard, write the index (tensors in ``order``);
    return the bytes written."""
    total = 0
    for w in writers:
        w.close()
        total += w.nbytes
    if len(writers) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: names[shard_of[n]] for n in order}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_output_files(plan: MergePlan, out: Path, dtype: torch.dtype, seed: int, title: str) -> None:
    """config.json, generation config, tokenizer, the recipe (``mergekit_config.yml``, every model by
    the absolute path it was read from) and a model card."""
    config = dict(plan.config)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ref_dir = plan.models[plan.reference_model].path
    if (ref_dir / "generation_config.json").is_file():
        shutil.copy2(ref_dir / "generation_config.json", out / "generation_config.json")
    write_tokenizer(plan, out)
    recipe_yaml = dump_recipe(plan.resolved_recipe())  # by absolute paths: mergekit-yaml reads no short names
    (out / "mergekit_config.yml").write_text(recipe_yaml)
    write_model_card(plan, out, recipe_yaml, seed, title)
