"""Recovery: train the LoRA adapters (and optionally the scales and zeros) of a quantized model, with
its low-bit codes frozen, by distillation from the float model.

Two phases, both on calibration token windows (`corpus.py`):

1. **Block reconstruction** (``block_steps`` per decoder block): each quantized block, fed the
   output of the already-recovered blocks before it, learns to reproduce the float block's output
   on the float model's own inputs (normalized MSE). Cheap on a CPU: no output projection, and one
   block's activations at a time.
2. **End to end** (``steps``): KL(teacher || student) over the vocabulary, with the teacher's top-k
   log-probs and tail mass cached once (the coarse-grained KL of `workbench.eval.kl`), so the teacher
   need not stay in memory.

The work directory holds ``checkpoint.pt`` (trainable tensors, optimizer, phase and step, written
atomically after every block and every ``checkpoint_every`` steps) and ``loss.jsonl``; the teacher's
top-k cache goes to ``teacher_cache`` (the CLI keys it by teacher files and windows in the home).
A rerun with the same directory resumes where the last checkpoint left off.
Batches are drawn from generators seeded with (seed, phase, step), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from workbench.atomic import atomic_file
from workbench.quant.model import quant_layers
from workbench.quant.options import RecoverOptions

Progress = Callable[[str, int, int, float | None], None]


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder blocks found")
    return max(lists, key=len)


def trainable(model: nn.Module, scale_lr: float) -> dict[str, nn.Parameter]:
    """Freeze everything but the adapters (and the scales and zeros when `scale_lr` > 0)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = {}
    for mname, m in quant_layers(model).items():
        m.keep_unpacked = True
        for leaf in ("lora_A", "lora_B") + (("scale", "zero") if scale_lr > 0 else ()):
            p = getattr(m, leaf)
            if p is not None:
                p.requires_grad_(True)
                names[f"{mname}.{leaf}"] = p
    return names


def _optimizer(params: dict[str, nn.Parameter], lr: float, scale_lr: float) -> torch.optim.Optimizer:
    lora = [p for n, p in params.items() if n.endswith(("lora_A", "lora_B"))]
    meta = [p for n, p in params.items() if n.endswith(("scale", "zero"))]
    groups = [{"params": lora, "lr": lr}] + ([{"params": meta, "lr": scale_lr}] if meta else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


def autocast(dtype: str):
    """bfloat16 autocast on the CPU (much faster where the CPU has bf16 instructions); float32: none."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _batch(n: int, batch_size: int, seed: int, phase: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + step)
    return torch.randperm(n, generator=g)[:batch_size]


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Inputs of the first decoder block for every window, and the keyword arguments (positions,
    masks) the model passes to its blocks for a batch of `batch_size` windows."""
    first = decoder_layers(model)[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    xs, kwargs = [], None
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                try:
                    model(windows[i:i + batch_size], use_cache=False)
                except _Stop:
                    pass
                xs.append(captured["x"].detach())
                kwargs = kwargs or captured["kwargs"]
    finally:
        handle.remove()
    return torch.cat(xs), kwargs


def _run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _block_outputs(block: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int, dtype: str) -> torch.Tensor:
    with torch.no_grad(), autocast(dtype):
        return torch.cat([_run_block(block, x[i:i + batch_size], kwargs).float()
                          for i in range(0, len(x), batch_size)])


def teacher_topk(teacher: nn.Module, windows: torch.Tensor, k: int, batch_size: int,
                 progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probs, their ids and the log tail mass at every window position."""
    vals, idxs, tails = [], [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            logp = teacher(windows[i:i + batch_size], use_cache=False).logits.float().log_softmax(-1)
            v, idx = logp.topk(k, dim=-1)
            tails.append(logp.scatter(-1, idx, float("-inf")).logsumexp(-1))
            vals.append(v)
            idxs.append(idx.int())
            if progress:
                progress("teacher", min(i + batch_size, len(windows)), len(windows), None)
    return {"logprobs": torch.cat(vals), "indices": torch.cat(idxs), "tail": torch.cat(tails)}


def kl_loss(student_logits: torch.Tensor, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean coarse-grained top-k KL(teacher || student) over positions (differentiable)."""
    logp = student_logits.float().log_softmax(-1)
    idx = cache["indices"].long()
    s_top = logp.gather(-1, idx)
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    t_logp, t_tail = cache["logprobs"].float(), cache["tail"].float()
    body = (t_logp.exp() * (t_logp - s_top)).sum(-1)
    tail = t_tail.exp() * (t_tail - s_tail)
    return (body + tail).mean()


class Recovery:
    """One recovery run over a work directory (resumable)."""

    def __init__(self, student: nn.Module, windows: torch.Tensor, opts: RecoverOptions, work_dir: Path,
                 teacher_loader: Callable[[], nn.Module], progress: Progress | None = None,
                 teacher_cache: Path | None = None):
        self.student, self.windows, self.opts = student, windows, opts
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.teacher_loader, self.progress = teacher_loader, progress
        self.teacher_cache_path = Path(teacher_cache) if teacher_cache else self.work_dir / "teacher_topk.safetensors"
        self.params = trainable(student, opts.scale_lr)
        self.state = {"phase": "blocks" if opts.block_steps else "e2e", "block": 0, "step": 0, "elapsed": 0.0}
        self.optimizer: torch.optim.Optimizer | None = None
        self._t0 = time.perf_counter()
        self._elapsed0 = 0.0
        self._resume()

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t0

    def _resume(self) -> None:
        path = self.work_dir / "checkpoint.pt"
        if not path.is_file():
            (self.work_dir / "options.json").write_text(json.dumps(asdict(self.opts), indent=2) + "\n")
            return
        ck = torch.load(path, weights_only=True)
        with torch.no_grad():
            for name, t in ck["trainable"].items():
                self.params[name].copy_(t)
        self.state = ck["state"]
        self._elapsed0 = float(self.state["elapsed"])
        if ck.get("optimizer") is not None:
            self.optimizer = _optimizer(self.params, self.opts.lr, self.opts.scale_lr)
            self.optimizer.load_state_dict(ck["optimizer"])
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop loss rows written after the checkpoint, so a resumed run logs each step once."""
        path = self.work_dir / "loss.jsonl"
        if not path.is_file():
            return
        phase, block, step = self.state["phase"], self.state["block"], self.state["step"]

        def kept(row: dict) -> bool:
            if row["phase"] == "blocks":
                return phase != "blocks" or row["block"] < block
            return phase == "done" or (phase == "e2e" and row["step"] < step)

        rows = [line for line in path.read_text().splitlines() if line and kept(json.loads(line))]
        with atomic_file(path) as f:
            f.write("".join(r + "\n" for r in rows))

    def checkpoint(self) -> None:
        self.state["elapsed"] = self.elapsed
        ck = {"trainable": {n: p.detach().clone() for n, p in self.params.items()}, "state": dict(self.state),
              "optimizer": self.optimizer.state_dict() if self.state["phase"] == "e2e" and self.optimizer else None}
        with atomic_file(self.work_dir / "checkpoint.pt", "wb") as f:
            torch.save(ck, f)

    def snapshot(self) -> None:
        """Keep the trainable tensors as they are now (for perplexity-vs-training-time curves)."""
        from safetensors.torch import save_file

        minutes = self.elapsed / 60
        path = self.work_dir / "snapshots" / f"{minutes:07.2f}min-step{self.state['step']}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.params.items()}, str(path))
        self.state["next_snapshot"] = self.elapsed + self.opts.snapshot_every

    def _log(self, **row) -> None:
        with open(self.work_dir / "loss.jsonl", "a") as f:
            f.write(json.dumps({**row, "elapsed": round(self.elapsed, 2)}) + "\n")

    def _budget(self, share: float) -> float | None:
        return None if self.opts.time_budget is None else self.opts.time_budget * share

    # -- phases ----------------------------------------------------------------------------------
    def run(self) -> dict:
        teacher = None
        if self.state["phase"] == "blocks":
            teacher = self.teacher_loader()
            self.reconstruct_blocks(teacher)
            self.state.update(phase="e2e", step=0)
            self.checkpoint()
        if self.state["phase"] == "e2e" and self.opts.steps:
            cache = self._teacher_cache(teacher)
            teacher = None
            self.end_to_end(cache)
        self.state["phase"] = "done"
        self.checkpoint()
        return {"elapsed": self.elapsed, **self.state}

    def reconstruct_blocks(self, teacher: nn.Module) -> None:
        o = self.opts
        n = max(o.batch_size, min(len(self.windows), o.block_tokens // o.seq_len) // o.batch_size * o.batch_size)
        windows = self.windows[:n]
        t_layers, s_layers = decoder_layers(teacher), decoder_layers(self.student)
        x_fp, kwargs = capture_block_inputs(teacher, windows, o.batch_size)
        x_q, _ = capture_block_inputs(self.student, windows, o.batch_size)
        deadline = self._budget(o.block_fraction)
        forward_seconds = 0.0  # the last block's two forward passes, to leave time for them
        for i, (tb, sb) in enumerate(zip(t_layers, s_layers)):
            t0 = time.perf_counter()
            y_fp = _block_outputs(tb, x_fp, kwargs, o.batch_size, o.dtype)
            if i >= self.state["block"]:
                seconds = None if deadline is None else max(
                    0.0, (deadline - self.elapsed) / (len(s_layers) - i) - forward_seconds)
                t1 = time.perf_counter()
                self._train_block(i, sb, x_q, y_fp, kwargs, seconds)
                t0 += time.perf_counter() - t1
                self.state["block"] = i + 1
                self.checkpoint()
            x_q = _block_outputs(sb, x_q, kwargs, o.batch_size, o.dtype)
            x_fp = y_fp
            forward_seconds = time.perf_counter() - t0
            if self.progress:
                self.progress("blocks", i + 1, len(s_layers), None)

    def _train_block(self, index: int, block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict,
                     seconds: float | None) -> None:
        o = self.opts
        params = {n: p for n, p in self.params.items() if any(p is q for q in block.parameters())}
        if not params:
            return
        opt = _optimizer(params, o.block_lr, o.scale_lr)
        var = y.var().clamp_min(1e-12)
        start = time.perf_counter()
        for step in range(o.block_steps):
            idx = _batch(len(x), o.batch_size, o.seed, 1 + index, step)
            with autocast(o.dtype):
                out = _run_block(block, x[idx], kwargs)
            loss = ((out.float() - y[idx]) ** 2).mean() / var
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or step == o.block_steps - 1 or step % 10 == 9:
                self._log(phase="blocks", block=index, step=step, loss=loss.item())
            if seconds is not None and time.perf_counter() - start > seconds:
                self._log(phase="blocks", block=index, step=step, loss=loss.item())
                break

    def _teacher_cache(self, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save

        path = self.teacher_cache_path
        if path.is_file():
            cache = load_file(str(path))
            if cache["logprobs"].shape[:2] == tuple(self.windows.shape):
                return cache
        teacher = teacher if teacher is not None else self.teacher_loader()
        with autocast(self.opts.dtype):
            cache = teacher_topk(teacher, self.windows, self.opts.top_k, self.opts.batch_size, self.progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            f.write(save({k: v.contiguous() for k, v in cache.items()}))
        return cache

    def end_to_end(self, cache: dict[str, torch.Tensor]) -> None:
        o = self.opts
        if self.optimizer is None:
            self.optimizer = _optimizer(self.params, o.lr, o.scale_lr)
        budget = self._budget(1.0)
        start = self.state.setdefault("e2e_start", self.elapsed)
        for step in range(self.state["step"], o.steps):
            # Progress through the schedule: by steps, or by time when a time budget ends the run first.
            done = step / o.steps if budget is None else max(step / o.steps, (self.elapsed - start) / max(1.0, budget - start))
            for group, base in zip(self.optimizer.param_groups, (o.lr, o.scale_lr)):
                group["lr"] = base * _cosine(step, done)
            idx = _batch(len(self.windows), o.batch_size, o.seed, 0, step)
            with autocast(o.dtype):
                logits = self.student(self.windows[idx], use_cache=False).logits
            loss = kl_loss(logits, {k: v[idx] for k, v in cache.items()})
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state["step"] = step + 1
            self._log(phase="e2e", step=step, loss=loss.item())
            if self.progress:
                self.progress("e2e", step + 1, o.steps, loss.item())
            if (step + 1) % o.checkpoint_every == 0:
                self.checkpoint()
            if o.snapshot_every and self.elapsed >= self.state.get("next_snapshot", o.snapshot_every):
                self.snapshot()
            if budget is not None and self.elapsed > budget:
                break


def _cosine(step: int, done: float, warmup: int = 5) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1 as `done` goes from 0 to 1."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def kl_on_windows(student: nn.Module, windows: torch.Tensor, cache: dict[str, torch.Tensor],
                  batch_size: int = 4) -> float:
    """Mean top-k KL of the student to the cached teacher over windows (for reports and tests)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            part = {k: v[i:i + batch_size] for k, v in cache.items()}
            logits = student(windows[i:i + batch_size], use_cache=False).logits
            total += kl_loss(logits, part).item() * len(part["tail"])
            n += len(part["tail"])
    return total / n

