"""Quantization actions: quantize, recover, export, and the three in a row (what the UI's Quantize
and Quant search screens run). `workbench quantize` / `recover` / `export` call the same functions.
Progress goes to a :class:`~workbench.progress.Progress` callback; nothing here prints.

Every output is checked before any long work: an existing file or non-empty directory is refused
unless `overwrite` (then replaced atomically). Reported perplexities are measured on the saved
directory, reloaded as `workbench eval` loads it.

Each takes ``device`` (cpu, cuda, cuda:N, auto: CUDA when present), resolved before anything
loads: quantization solves each weight there, recovery trains there, evaluations and the exports'
dequantization run there; whatever is saved is moved to the CPU first."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from workbench.atomic import atomic_dir, check_output
from workbench.errors import WorkbenchError
from workbench.quant.options import RecoverOptions

from workbench.tasks import HELDOUT_PPL_TASK as EVAL_TASK
from workbench.progress import ProgressFn, emit

EXPORT_FORMATS = ("safetensors", "peft", "gguf", "hf")
RECOVER_STAGES = {"blocks": "block reconstruction", "teacher": "teacher top-k", "e2e": "end-to-end KL"}


def quantize(model: str | Path, config: str | Path, out: str | Path, eval_task: str | None = EVAL_TASK,
             progress: ProgressFn | None = None, overwrite: bool = False, allow_nonfinite: bool = False,
             device: str = "auto") -> dict:
    """`workbench quantize` as a function: quantize a float model (directory or home model name) by a
    config file into the compressed directory `out` (refused when it holds something, unless
    `overwrite`); return the summary (size report, seconds, disk bytes and, with `eval_task`,
    held-out perplexity of the float model and of the saved directory). The model stays on the CPU;
    each weight is solved on `device`, and the perplexities are measured there.

    Progress: stage "quantize", done 0 before the first layer, then after each (text: the layer)."""
    from workbench.devices import resolve_device

    dev = resolve_device(device)
    from workbench.models.loader import check_finite, load_model, model_kind, resolve_model
    from workbench.quant.config import check_model, load_quant_config
    from workbench.quant.model import (
        empty_model,
        float_weight,
        linear_layers,
        quantize_model,
        save_quantized,
        size_report,
    )

    check_output(out, overwrite)
    cfg = load_quant_config(config)
    source = resolve_model(model)
    if model_kind(source) != "float":
        raise WorkbenchError(f"{source}: a {model_kind(source)} model; quantize a float model directory")
    import torch

    with torch.device("meta"):   # the layer shapes from the config alone: the config is checked before loading
        skeleton = empty_model(source)
    settings = check_model(cfg, {n: tuple(float_weight(m).shape) for n, m in linear_layers(skeleton).items()})
    del skeleton
    net, tok = load_model(source)
    if not allow_nonfinite:
        check_finite(net, source)
    from workbench.ops.evaluate import heldout_perplexity, saved_perplexity

    ppl_float = None if eval_task is None else heldout_perplexity(net, tok, eval_task, dev)
    net.to("cpu")
    emit(progress, "quantize", 0, len(settings))
    start = time.perf_counter()
    quantize_model(net, cfg, lambda name, done, total: emit(progress, "quantize", done, total, name), device=dev)
    seconds = time.perf_counter() - start
    save_quantized(net, out, source, cfg, overwrite=overwrite, extra={"source_model": str(source.absolute())})
    from workbench.quant.kernels import unfused_layers

    report = {**size_report(net, cfg.storage), "unfused_layers": unfused_layers(net)}
    del net
    ppl = None if eval_task is None else saved_perplexity(out, eval_task, dev)
    return {**report, "seconds": seconds, "ppl_float": ppl_float, "ppl": ppl, "device": str(dev),
            "out": str(out), "disk_bytes": sum(p.stat().st_size for p in Path(out).iterdir())}


def recover(qdir: str | Path, teacher: str | Path, out: str | Path, opts: RecoverOptions,
            corpus: str = "pydoc,licenses", eval_task: str | None = EVAL_TASK, keep_work: bool = False,
            progress: ProgressFn | None = None, on_resume: Callable[[Path], None] | None = None,
            overwrite: bool = False, device: str = "auto") -> dict:
    """`workbench recover` as a function: train the adapters of the compressed directory `qdir` by
    distillation from the float model `teacher`; write the result to `out` (refused when it holds
    something, unless `overwrite`; work in progress in OUT.work, resumed when it holds a checkpoint:
    `on_resume(work_dir)` is called then) and return the summary (size report, recovery options,
    seconds, steps, perplexities with `eval_task`, and `phases`: each phase's seconds against its
    share of `opts.time_budget`).

    The budget counts from this call on (loading included) up to the end of training; the final
    save and the held-out evaluation of the saved directory ("save_eval") come on top of it.
    Training (student, teacher, the teacher's top-k cache) and the evaluations run on `device`; the
    recovered model is moved to the CPU before it is saved. Progress stages: RECOVER_STAGES' values
    (with the loss)."""
    started = time.perf_counter()
    from workbench.devices import resolve_device

    dev = resolve_device(device)
    check_output(out, overwrite)
    if opts.time_budget is not None and not opts.time_budget > 0:
        raise WorkbenchError(f"time budget: expected a positive number of seconds, got {opts.time_budget}")
    from transformers import AutoConfig, AutoTokenizer

    from workbench.quant.corpus import corpus_texts, token_windows
    from workbench.quant.model import load_quantized, model_to_cpu, read_quant_meta, size_report
    from workbench.quant.recover import Recovery

    meta = read_quant_meta(qdir)
    work = Path(str(out).rstrip("/") + ".work")
    if (work / "checkpoint.pt").is_file():
        from workbench.models.checkpoint import load_training_state

        load_training_state(work / "checkpoint.pt")   # a file we did not write is refused before any work
    if not any(e["lora_rank"] for e in meta["layers"].values()) and opts.scale_lr <= 0:
        raise WorkbenchError(f"{qdir}: nothing to train: no LoRA adapters (quantize with `lora: {{rank: N}}`) "
                             "and --scale-lr 0")
    from workbench.models.loader import load_model, model_kind, resolve_model

    try:
        teacher_dir = resolve_model(teacher)
    except WorkbenchError as e:
        raise WorkbenchError(f"--teacher {e}") from None
    if model_kind(teacher_dir) != "float":
        raise WorkbenchError(f"--teacher {teacher_dir}: a {model_kind(teacher_dir)} model; the teacher is the "
                             "float model the quantized one was made from")
    t_cfg, s_cfg = AutoConfig.from_pretrained(str(teacher_dir)), AutoConfig.from_pretrained(str(qdir))
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(t_cfg, key, None) != getattr(s_cfg, key, None):
            raise WorkbenchError(f"--teacher {teacher_dir}: {key} is {getattr(t_cfg, key, None)!r}, but the quantized "
                                 f"model's is {getattr(s_cfg, key, None)!r}")
    tok = AutoTokenizer.from_pretrained(str(qdir))
    check_same_tokenizer(AutoTokenizer.from_pretrained(str(teacher_dir)), tok, teacher_dir, qdir)
    from workbench.memory_plan import recovery_plan

    recovery_plan(qdir, teacher_dir, opts, dev).check()   # headers only: refused before student or teacher loads
    windows = token_windows(tok, corpus_texts(corpus), opts.seq_len, opts.max_tokens, opts.seed)
    student = load_quantized(qdir)
    from workbench.ops.evaluate import heldout_perplexity

    ppl_before = None if eval_task is None else heldout_perplexity(student, tok, eval_task, dev)
    if (work / "checkpoint.pt").is_file() and on_resume:
        on_resume(work)

    def load_teacher():
        return load_model(teacher_dir)[0]

    def on_step(phase: str, done: int, total: int, loss: float | None) -> None:
        emit(progress, RECOVER_STAGES[phase], done, total, "" if loss is None else f"loss {loss:.4f}", loss)

    rec = Recovery(student, windows, opts, work, load_teacher, on_step,
                   _teacher_cache_path(teacher_dir, windows, opts), started=started, device=dev)
    result = rec.run()
    del rec
    model_to_cpu(student)
    recovery = {"options": vars(opts), "corpus": corpus, "calibration_tokens": int(windows.numel()),
                "seconds": result["elapsed"], "steps": result["step"], "ppl_before": ppl_before,
                "windows": result["windows"], "e2e_windows": result.get("e2e_windows", 0),
                "blocks_skipped": result.get("blocks_skipped", 0), "phases": result["phases"]}
    report = size_report(student)
    _save_recovered(student, qdir, meta, out, work, recovery, eval_task, overwrite, dev)
    if not keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {**report, **recovery, "out": str(out), "device": str(dev)}


def _save_recovered(student, qdir: str | Path, meta: dict, out: str | Path, work: Path, recovery: dict,
                    eval_task: str | None, overwrite: bool, device=None) -> None:
    """Save the recovered model, measure `ppl_after` on the saved files, and only then rename the
    directory into place with that figure (and the "save_eval" phase) in its quant_config.json."""
    import json

    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import save_quantized

    from workbench.ops.evaluate import saved_perplexity

    start = time.perf_counter()
    cfg = None
    if meta.get("config"):
        cfg = quant_config_from_dict(meta["config"], str(Path(qdir) / "quant_config.json"))
    extra = {"source_model": meta.get("source_model"), "recovery": recovery}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_quantized(student, tmp, qdir, cfg, overwrite=True, extra=extra)
        losses = work / "loss.jsonl"   # absent when the budget left no time for a single step
        (tmp / "loss.jsonl").write_text(losses.read_text() if losses.is_file() else "")
        recovery["ppl_after"] = None if eval_task is None else saved_perplexity(tmp, eval_task, device)
        recovery["phases"]["save_eval"] = {"seconds": time.perf_counter() - start, "share": None}
        meta_path = tmp / "quant_config.json"
        saved = json.loads(meta_path.read_text())
        saved["recovery"] = recovery
        meta_path.write_text(json.dumps(saved, indent=2) + "\n")


def _teacher_cache_path(teacher_dir: Path, windows, opts) -> Path:
    """Shared by runs with the same teacher, calibration windows, k and dtype (e.g. 2-bit and ternary)."""
    import hashlib

    from workbench.eval.kl import model_files_hash
    from workbench.home import workbench_home

    h = hashlib.sha256(f"{model_files_hash(teacher_dir)}\0{opts.top_k}\0{opts.dtype}\0".encode())
    h.update(windows.numpy().tobytes())
    return workbench_home() / "recover-cache" / f"{h.hexdigest()[:32]}.safetensors"


def check_same_tokenizer(teacher_tok, student_tok, teacher_dir: Path, student_dir: str | Path) -> None:
    """Distillation compares the two models' distributions token by token: both must map text to
    the same ids. A mismatch names the first token that differs."""
    from workbench.merge.tokenizer import vocab_difference

    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    token = vocab_difference(t, s)
    if token is None:
        return
    raise WorkbenchError(f"--teacher {teacher_dir}: its tokenizer differs from {student_dir}'s ({len(t)} vs {len(s)} "
                         f"tokens; first difference: {token!r} is {t.get(token)} vs {s.get(token)}); the teacher "
                         "must be the float model the quantized one was made from")


def check_compressed_dir(qdir: str | Path) -> None:
    """Refuse what is not a compressed directory (from `workbench quantize` or `recover`), naming
    what it is instead."""
    path = Path(qdir)
    if (path / "quant_config.json").is_file():
        return
    if not path.exists():
        found = "nothing is there"
    elif path.is_file():
        found = "a GGUF file" if path.suffix == ".gguf" else "a file"
    elif (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        found = "a float model directory (config.json and safetensors weights): quantize it first"
    else:
        names = sorted(p.name for p in path.iterdir())
        found = "an empty directory" if not names else "a directory holding " + ", ".join(names[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise WorkbenchError(f"{qdir}: expected a compressed directory (quant_config.json, from `workbench quantize` "
                         f"or `recover`), found {found}")


def export_paths(qdir: str | Path, out: str | Path, fmt: str) -> list[Path]:
    """What `export` writes: `out`, and for GGUF of a model with adapters OUT.lora.gguf."""
    from workbench.quant.model import read_quant_meta

    out = Path(out)
    if fmt == "gguf" and any(e["lora_rank"] for e in read_quant_meta(qdir)["layers"].values()):
        return [out, out.with_name(out.stem + ".lora.gguf")]
    return [out]


def export(qdir: str | Path, out: str | Path, fmt: str, storage: str = "packed",
           ternary_type: str = "TQ2_0", fallback: str = "Q4", overwrite: bool = False,
           progress: ProgressFn | None = None, device: str = "cpu") -> dict:
    """`workbench export` as a function: write the compressed directory `qdir` as `fmt` (safetensors,
    peft, hf or gguf; GGUF adds OUT.lora.gguf when the model has adapters) to `out`; return a report.
    Outputs that hold something are refused before any work unless `overwrite`. `device`: where
    gguf, hf and peft dequantize the layers (and hf merges the adapters); a safetensors export only
    repacks, on the CPU."""
    from workbench.devices import resolve_device
    from workbench.quant.model import load_quantized, read_quant_meta, save_quantized

    dev = resolve_device(device)
    if fmt not in EXPORT_FORMATS:
        raise WorkbenchError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    check_compressed_dir(qdir)
    meta = read_quant_meta(qdir)
    paths = export_paths(qdir, out, fmt)
    for path in paths:
        check_output(path, overwrite, file=fmt == "gguf")
    out = Path(out)
    emit(progress, "export", text=f"exporting {qdir} as {fmt} to {out}")
    if fmt == "gguf":
        from workbench.export.gguf import export_gguf, export_gguf_with_lora

        if len(paths) > 1:   # both files committed together: never a model .gguf without its adapters
            return export_gguf_with_lora(qdir, out, paths[1], ternary_type=ternary_type, fallback=fallback,
                                         device=dev)
        return export_gguf(qdir, out, ternary_type=ternary_type, fallback=fallback, device=dev)
    model = load_quantized(qdir)
    if fmt == "safetensors":
        save_quantized(model, out, qdir, storage=storage, overwrite=overwrite,
                       extra={k: v for k, v in meta.items() if k not in ("format", "version", "layers", "tied", "config")})
        return {"format": "safetensors", "path": str(out)}
    from workbench.models.loader import quiet_transformers

    with quiet_transformers():
        if fmt == "peft":
            from workbench.export.peft import export_peft

            return export_peft(model.to(dev), qdir, out, overwrite=overwrite)
        from workbench.export.hf import export_hf

        return export_hf(model.to(dev), qdir, out, overwrite=overwrite)


def quantize_recover_export(source: str | Path, config: str | Path, out: str | Path, minutes: float = 0,
                            recovered: str | Path | None = None, fmt: str = "none",
                            export_out: str | Path | None = None, eval_task: str | None = EVAL_TASK,
                            overwrite: bool = False, progress: ProgressFn | None = None,
                            on_resume: Callable[[Path], None] | None = None, device: str = "auto") -> dict:
    """Quantize `source` by `config` into `out`, recover it for `minutes` into `recovered` (when
    minutes > 0) and export the last of those as `fmt` to `export_out` (unless fmt is "none"): what
    the UI's Quantize and Quant search screens run. Returns {"quantized", "recovery", "export"} (the
    reports of the three functions; None for a step not taken). Each step starts with a Progress of
    unknown length whose text says what it does. Every step runs on `device`."""
    from workbench.devices import resolve_device

    dev = resolve_device(device)
    result: dict = {"quantized": quantize(source, config, out, eval_task=eval_task, progress=progress,
                                          overwrite=overwrite, device=dev), "recovery": None, "export": None}
    final = Path(out)
    if minutes > 0 and recovered is not None:
        emit(progress, "recover", text=f"recovery ({minutes:g} min): calibration text and teacher...")
        result["recovery"] = recover(out, source, recovered, RecoverOptions(time_budget=minutes * 60),
                                     eval_task=eval_task, progress=progress, overwrite=overwrite, on_resume=on_resume,
                                     device=dev)
        final = Path(recovered)
    if fmt != "none" and export_out is not None:
        result["export"] = export(final, export_out, fmt, overwrite=overwrite, progress=progress, device=dev)
    return result
