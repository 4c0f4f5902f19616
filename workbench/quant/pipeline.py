"""Quantize, recover and export as plain functions: what `workbench quantize` / `recover` /
`export` and the terminal UI's Quantize screen both call. Progress goes to callbacks; nothing here
prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.quant.options import RecoverOptions

EVAL_TASK = "zoo-perplexity"  # its `heldout` split: license texts never used for calibration
EXPORT_FORMATS = ("safetensors", "peft", "gguf", "hf")

ProgressFn = Callable[[str, int, int], None]
RecoverProgressFn = Callable[[str, int, int, float | None], None]


def heldout_perplexity(model, tokenizer, task: str = EVAL_TASK) -> float:
    import torch

    from workbench.eval.evaluator import evaluate

    with torch.no_grad():
        (result,) = evaluate(model, tokenizer, task, split="heldout").values()
    return result.metrics["ppl"]


def quantize_to_dir(model: str | Path, config: str | Path, out: str | Path, eval_task: str | None = EVAL_TASK,
                    progress: ProgressFn | None = None) -> dict:
    """`workbench quantize` as a function: quantize a float model (directory or home model name) by a
    config file into the compressed directory `out`; return the summary (size report, seconds, disk
    bytes and, with `eval_task`, held-out perplexity before and after).

    `progress(layer, done, total)` is called once with done 0 before the first layer, then after each."""
    from workbench.eval.cli import load_model, resolve_model_dir
    from workbench.quant.config import check_model, load_quant_config
    from workbench.quant.model import (
        float_weight,
        linear_layers,
        quantize_model,
        save_quantized,
        size_report,
    )

    cfg = load_quant_config(config)
    source = resolve_model_dir(model)
    net, tok = load_model(source)
    settings = check_model(cfg, {n: tuple(float_weight(m).shape) for n, m in linear_layers(net).items()})
    ppl_float = None if eval_task is None else heldout_perplexity(net, tok, eval_task)
    if progress:
        progress("", 0, len(settings))
    start = time.perf_counter()
    quantize_model(net, cfg, progress)
    seconds = time.perf_counter() - start
    save_quantized(net, out, source, cfg, extra={"source_model": str(source.absolute())})
    ppl = None if eval_task is None else heldout_perplexity(net, tok, eval_task)
    return {**size_report(net, cfg.storage), "seconds": seconds, "ppl_float": ppl_float, "ppl": ppl,
            "out": str(out), "disk_bytes": sum(p.stat().st_size for p in Path(out).iterdir())}


def recover_to_dir(qdir: str | Path, teacher: str | Path, out: str | Path, opts: RecoverOptions,
                   corpus: str = "pydoc,licenses", eval_task: str | None = EVAL_TASK, keep_work: bool = False,
                   progress: RecoverProgressFn | None = None,
                   on_resume: Callable[[Path], None] | None = None) -> dict:
    """`workbench recover` as a function: train the adapters of the compressed directory `qdir` by
    distillation from the float model `teacher`; write the result to `out` (work in progress in
    OUT.work, resumed when it holds a checkpoint: `on_resume(work_dir)` is called then) and return the
    summary (size report, recovery options, seconds, steps, perplexities with `eval_task`).

    `progress(phase, done, total, loss)`: phases "blocks", "teacher" and "e2e"."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.corpus import corpus_texts, token_windows
    from workbench.quant.model import (
        load_quantized,
        read_quant_meta,
        save_quantized,
        size_report,
    )
    from workbench.quant.recover import Recovery

    meta = read_quant_meta(qdir)
    if not any(e["lora_rank"] for e in meta["layers"].values()) and opts.scale_lr <= 0:
        raise WorkbenchError(f"{qdir}: nothing to train: no LoRA adapters (quantize with `lora: {{rank: N}}`) "
                             "and --scale-lr 0")
    teacher_dir = Path(teacher)
    if not (teacher_dir / "config.json").is_file():
        raise WorkbenchError(f"--teacher {teacher_dir}: not a model directory (no config.json)")
    t_cfg, s_cfg = AutoConfig.from_pretrained(str(teacher_dir)), AutoConfig.from_pretrained(str(qdir))
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(t_cfg, key, None) != getattr(s_cfg, key, None):
            raise WorkbenchError(f"--teacher {teacher_dir}: {key} is {getattr(t_cfg, key, None)!r}, but the quantized "
                                 f"model's is {getattr(s_cfg, key, None)!r}")
    tok = AutoTokenizer.from_pretrained(str(qdir))
    windows = token_windows(tok, corpus_texts(corpus), opts.seq_len, opts.max_tokens, opts.seed)
    student = load_quantized(qdir)
    ppl_before = None if eval_task is None else heldout_perplexity(student, tok, eval_task)
    work = Path(str(out).rstrip("/") + ".work")
    if work.exists() and (work / "checkpoint.pt").exists() and on_resume:
        on_resume(work)

    def load_teacher():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32,
                                                    use_safetensors=True).eval()

    rec = Recovery(student, windows, opts, work, load_teacher, progress,
                   _teacher_cache_path(teacher_dir, windows, opts))
    result = rec.run()
    ppl_after = None if eval_task is None else heldout_perplexity(student, tok, eval_task)
    extra = {"source_model": meta.get("source_model"), "recovery": {
        "options": vars(opts), "corpus": corpus, "calibration_tokens": int(windows.numel()),
        "seconds": result["elapsed"], "steps": result["step"], "ppl_before": ppl_before, "ppl_after": ppl_after}}
    cfg = None
    if meta.get("config"):
        cfg = quant_config_from_dict(meta["config"], str(Path(qdir) / "quant_config.json"))
    save_quantized(student, out, qdir, cfg, extra=extra)
    (Path(out) / "loss.jsonl").write_text((work / "loss.jsonl").read_text())
    if not keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {**size_report(student), **extra["recovery"], "out": str(out)}


def _teacher_cache_path(teacher_dir: Path, windows, opts) -> Path:
    """Shared by runs with the same teacher, calibration windows, k and dtype (e.g. 2-bit and ternary)."""
    import hashlib

    from workbench.eval.kl import model_files_hash
    from workbench.home import workbench_home

    h = hashlib.sha256(f"{model_files_hash(teacher_dir)}\0{opts.top_k}\0{opts.dtype}\0".encode())
    h.update(windows.numpy().tobytes())
    return workbench_home() / "recover-cache" / f"{h.hexdigest()[:32]}.safetensors"


def export_quantized(qdir: str | Path, out: str | Path, fmt: str, storage: str = "packed",
                     ternary_type: str = "TQ2_0", fallback: str = "F16") -> dict:
    """`workbench export` as a function: write the compressed directory `qdir` as `fmt` (safetensors,
    peft, hf or gguf; GGUF adds OUT.lora.gguf when the model has adapters) to `out`; return a report."""
    from workbench.quant.model import load_quantized, read_quant_meta, save_quantized

    if fmt not in EXPORT_FORMATS:
        raise WorkbenchError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    meta = read_quant_meta(qdir)
    model = load_quantized(qdir)
    out = Path(out)
    if fmt == "safetensors":
        save_quantized(model, out, qdir, storage=storage,
                       extra={k: v for k, v in meta.items() if k not in ("format", "version", "layers", "tied", "config")})
        return {"format": "safetensors", "path": str(out)}
    if fmt == "peft":
        from workbench.export.peft import export_peft

        return export_peft(model, qdir, out)
    if fmt == "hf":
        from workbench.export.hf import export_hf

        return export_hf(model, qdir, out)
    from workbench.export.gguf import export_gguf, export_lora_gguf

    report = export_gguf(qdir, out, ternary_type=ternary_type, fallback=fallback)
    if any(e["lora_rank"] for e in meta["layers"].values()):
        lora_out = out.with_name(out.stem + ".lora.gguf")
        report["lora"] = export_lora_gguf(qdir, lora_out)
    return report

