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

With a time budget (``time_budget`` seconds on a clock that starts with the whole command and is
checkpointed, so a resumed run continues it), the phases run in this order, each within its share:

- ``load`` (models, calibration windows, opening evaluation: whatever it takes, out of the budget);
- ``teacher_cache``: at most ``cache_fraction`` of the end-to-end share; when it runs out, fewer
  windows are cached and the end-to-end phase trains on those (none cached: no end-to-end phase);
- ``blocks``: ``block_fraction`` of the training time (the budget left after loading), forward passes
  and input capture included; a block gets an even part of what is left, and when no block fits any
  more the rest are skipped (neither trained nor run);
- ``e2e``: the rest of the budget; a step that would end past it is not started.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from workbench.atomic import atomic_file
from workbench.devices import to_cpu
from workbench.faults import fault_point
from workbench.models.anatomy import decoder_blocks
from workbench.models.checkpoint import load_training_state
from workbench.quant.model import quant_layers
from workbench.quant.options import RecoverOptions

Progress = Callable[[str, int, int, float | None], None]
PHASES = ("load", "teacher_cache", "blocks", "e2e")  # in the order they run


class _Stop(Exception):
    pass


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


def autocast_spec(dtype: str, device: torch.device | str = "cpu") -> tuple[str, torch.dtype, bool]:
    """(device type, autocast dtype, enabled) for training forward passes in `dtype` on `device`:
    bfloat16 autocast on the device's own type ("cpu": much faster where the CPU has bf16
    instructions; "cuda": tensor cores), none for float32."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    return torch.device(device).type, torch.bfloat16, dtype == "bfloat16"


def autocast(dtype: str, device: torch.device | str = "cpu"):
    """The autocast context `autocast_spec` describes."""
    device_type, cast, enabled = autocast_spec(dtype, device)
    return torch.autocast(device_type, dtype=cast, enabled=enabled)


def _batch(n: int, batch_size: int, seed: int, phase: int, step: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """The batch's row indices, drawn on the CPU (the same on every device), placed on `device`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + step)
    return torch.randperm(n, generator=g)[:batch_size].to(device)


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Inputs of the first decoder block for every window, and the keyword arguments (positions,
    masks) the model passes to its blocks for a batch of `batch_size` windows."""
    first = decoder_blocks(model)[0]
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


def _block_outputs(block: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int, dtype: str,
                   limit: float | None = None) -> torch.Tensor | None:
    """The block's outputs for every row of `x`; None as soon as the batches done so far show the
    whole pass would take more than `limit` seconds (the pass is then left unfinished)."""
    outs, start = [], time.perf_counter()
    with torch.no_grad(), autocast(dtype, x.device):
        for i in range(0, len(x), batch_size):
            if limit is not None and i and (time.perf_counter() - start) * len(x) / i > limit:
                return None
            outs.append(_run_block(block, x[i:i + batch_size], kwargs).float())
    return torch.cat(outs)


def teacher_topk(teacher: nn.Module, windows: torch.Tensor, k: int, batch_size: int,
                 progress: Progress | None = None, time_left: Callable[[], float] | None = None,
                 offset: int = 0, total: int | None = None) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probs, their ids and the log tail mass at every window position.

    With `time_left` (seconds), a batch that would not end in time is not started: the result then
    covers the first windows only (maybe none). The first batch is then a single window, so that the
    time per window is known before a whole batch is risked (on SmolLM2 under load one 4 x 256
    batch took 60-106 s against a 38 s share). Progress counts from `offset` windows of `total`.
    Runs on the teacher's device (windows are moved there); the result is on that device."""
    vals, idxs, tails = [], [], []
    param = next(teacher.parameters(), None)
    device = windows.device if param is None else param.device   # a wrapper without parameters: as given
    total = offset + len(windows) if total is None else total
    per_window = 0.0  # seconds per window, measured on the batches so far
    i = 0
    with torch.no_grad():
        while i < len(windows):
            size = batch_size if time_left is None or vals else 1
            size = min(size, len(windows) - i)
            if time_left is not None and time_left() <= per_window * size:
                break
            t0 = time.perf_counter()
            logp = teacher(windows[i:i + size].to(device), use_cache=False).logits.float().log_softmax(-1)
            v, idx = logp.topk(k, dim=-1)
            tails.append(logp.scatter(-1, idx, float("-inf")).logsumexp(-1))
            vals.append(v)
            idxs.append(idx.int())
            per_window = max(per_window, (time.perf_counter() - t0) / size)
            i += size
            if progress:
                progress("teacher", offset + i, total, None)
    if not vals:
        t = windows.shape[1]
        return {"logprobs": torch.empty(0, t, k, device=device), "tail": torch.empty(0, t, device=device),
                "indices": torch.empty(0, t, k, dtype=torch.int32, device=device)}
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
    """One recovery run over a work directory (resumable), within `opts.time_budget` when given.

    `started` (a `time.perf_counter()` value) is when the command began: the loading before the
    run counts against the budget (default: now). Training runs on `device`: the student, the
    windows, the teacher (as `teacher_loader` returns it) and its top-k cache are moved there, with
    `autocast_spec`'s autocast; everything written (checkpoint, snapshots, teacher cache) is moved
    to the CPU first. The student stays on `device`: the caller moves it back before saving."""

    def __init__(self, student: nn.Module, windows: torch.Tensor, opts: RecoverOptions, work_dir: Path,
                 teacher_loader: Callable[[], nn.Module], progress: Progress | None = None,
                 teacher_cache: Path | None = None, started: float | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.student, self.windows, self.opts = student.to(self.device), windows.to(self.device), opts
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.teacher_loader, self.progress = teacher_loader, progress
        self.teacher_cache_path = Path(teacher_cache) if teacher_cache else self.work_dir / "teacher_topk.safetensors"
        self.params = trainable(student, opts.scale_lr)
        self.state = {"phase": "blocks" if opts.block_steps else "e2e", "block": 0, "step": 0, "elapsed": 0.0,
                      "phases": {}}
        self.optimizer: torch.optim.Optimizer | None = None
        self._t0 = time.perf_counter() if started is None else started
        self._elapsed0 = 0.0
        self._phase: str | None = "load"
        self._phase_t0 = self._t0
        self._block_step_seconds = 0.0  # the last block-phase step, to tell whether another one fits
        self._resume()

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t0

    def _resume(self) -> None:
        path = self.work_dir / "checkpoint.pt"
        if not path.is_file():
            # rows a killed run logged before its first checkpoint belong to no state: start the log anew
            (self.work_dir / "loss.jsonl").unlink(missing_ok=True)
            (self.work_dir / "options.json").write_text(json.dumps(asdict(self.opts), indent=2) + "\n")
            return
        ck = load_training_state(path)
        with torch.no_grad():
            for name, t in ck["trainable"].items():
                self.params[name].copy_(t)
        self.state = ck["state"]
        self.state.setdefault("phases", {})
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
        state = {**self.state, "phases": self.phase_seconds()}
        ck = {"trainable": {n: p.detach().cpu().clone() for n, p in self.params.items()}, "state": state,
              "optimizer": to_cpu(self.optimizer.state_dict()) if self.state["phase"] == "e2e" and self.optimizer
              else None}
        with atomic_file(self.work_dir / "checkpoint.pt", "wb") as f:
            torch.save(ck, f)
        fault_point("recover:checkpoint")

    def snapshot(self) -> None:
        """Keep the trainable tensors as they are now (for perplexity-vs-training-time curves)."""
        from safetensors.torch import save_file

        minutes = self.elapsed / 60
        path = self.work_dir / "snapshots" / f"{minutes:07.2f}min-step{self.state['step']}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(path))
        self.state["next_snapshot"] = self.elapsed + self.opts.snapshot_every

    def _log(self, **row) -> None:
        with open(self.work_dir / "loss.jsonl", "a") as f:
            f.write(json.dumps({**row, "elapsed": round(self.elapsed, 2)}) + "\n")

    # -- time budget -----------------------------------------------------------------------------
    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent in each phase so far (the earlier runs of a resumed one included)."""
        seconds = dict(self.state.get("phases", {}))
        if self._phase is not None:
            seconds[self._phase] = seconds.get(self._phase, 0.0) + time.perf_counter() - self._phase_t0
        return seconds

    def _enter(self, phase: str | None) -> None:
        self.state["phases"] = self.phase_seconds()
        self._phase, self._phase_t0 = phase, time.perf_counter()

    def _deadline(self, phase: str) -> float | None:
        """When `phase`, starting now, must end on the run's clock (None: no budget). Set when the
        phase first starts and kept across resumes; a resume with another budget plans anew."""
        budget, o, s = self.opts.time_budget, self.opts, self.state
        if budget is None:
            return None
        if s.get("budget") != budget:
            s.update(budget=budget, deadlines={}, shares={}, train_start=self.elapsed)
        if phase not in s["deadlines"]:
            now, train = self.elapsed, max(0.0, budget - s["train_start"])
            blocks = 0.0 if not o.block_steps else train * (o.block_fraction if o.steps else 1.0)
            share = {"teacher_cache": o.cache_fraction * (train - blocks), "blocks": blocks}.get(phase, budget - now)
            s["deadlines"][phase] = min(budget, now + share)
            s["shares"][phase] = max(0.0, s["deadlines"][phase] - now)
        return s["deadlines"][phase]

    def _time_left(self, deadline: float | None) -> float:
        return math.inf if deadline is None else deadline - self.elapsed

    def phase_report(self) -> dict[str, dict]:
        """{phase: {"seconds", "share"}} for the phases that ran; the share is None without a budget
        (loading's is the whole budget: it comes first)."""
        seconds, shares, budget = self.phase_seconds(), self.state.get("shares", {}), self.opts.time_budget
        return {p: {"seconds": seconds[p], "share": budget if p == "load" or budget is None else shares.get(p)}
                for p in PHASES if p in seconds}

    # -- phases ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """The phases not done yet; return the state with `elapsed`, `phases` (each one's seconds
        against its share) and `windows` (the calibration windows; `e2e_windows` were trained on)."""
        e2e = bool(self.opts.steps) and self.state["phase"] != "done"
        cache = self._cached_topk() if e2e else None
        teacher = None
        if self.state["phase"] == "blocks" or (e2e and self._cache_size(cache) < self._cache_target()):
            teacher = self.teacher_loader().to(self.device)
        if e2e:
            self._enter("teacher_cache")
            cache = self._teacher_cache(teacher, cache)
        if self.state["phase"] == "blocks":
            self._enter("blocks")
            self.reconstruct_blocks(teacher)
            self.state.update(phase="e2e", step=0)
            self.checkpoint()
        teacher = None
        if self.state["phase"] == "e2e" and self._cache_size(cache):
            self._enter("e2e")
            self.end_to_end(cache)
        self._enter(None)
        self.state["phase"] = "done"
        self.checkpoint()
        return {**self.state, "elapsed": self.elapsed, "phases": self.phase_report(), "windows": len(self.windows)}

    def reconstruct_blocks(self, teacher: nn.Module) -> None:
        """Train each block to reproduce the teacher's, within the phase's share of the budget: a
        block gets an even part of the time left (its forward passes included); when that leaves no
        time to train, this block and the rest are skipped."""
        o = self.opts
        deadline = self._deadline("blocks")
        n = max(o.batch_size, min(len(self.windows), o.block_tokens // o.seq_len) // o.batch_size * o.batch_size)
        windows = self.windows[:n]
        t_layers, s_layers = decoder_blocks(teacher), decoder_blocks(self.student)
        total, first = len(s_layers), self.state["block"]
        if self._time_left(deadline) <= 0:
            return self._skip_blocks(first, total)
        x_fp, kwargs = capture_block_inputs(teacher, windows, o.batch_size)
        x_q, _ = capture_block_inputs(self.student, windows, o.batch_size)
        f_t = f_s = 0.0  # seconds of the last teacher and student block forward passes
        for i, (tb, sb) in enumerate(zip(t_layers, s_layers)):
            if self._block_time(deadline, i, first, total, f_t + f_s) <= 0:
                return self._skip_blocks(max(i, first), total)
            t0 = time.perf_counter()
            slot = self._time_left(deadline) / (total - i)  # this block's even part of the time left
            limit = None if deadline is None else (slot if i >= first else self._time_left(deadline))
            y_fp = _block_outputs(tb, x_fp, kwargs, o.batch_size, o.dtype, limit)
            if y_fp is None:  # its forward pass alone would take the block's time
                return self._skip_blocks(max(i, first), total)
            f_t = time.perf_counter() - t0
            last = i == total - 1
            if i >= first:
                seconds = None if deadline is None else slot - f_t - (0.0 if last else f_s)
                if not self._train_block(i, sb, x_q, y_fp, kwargs, seconds) and deadline is not None:
                    self.state["blocks_skipped"] = self.state.get("blocks_skipped", 0) + 1
                self.state["block"] = i + 1
                self.checkpoint()
            if last:
                break
            if self._block_time(deadline, i + 1, first, total, f_t + f_s, owed=f_s) <= 0:
                return self._skip_blocks(max(i + 1, first), total)  # the next block would not fit: stop here
            t0 = time.perf_counter()
            x_q = _block_outputs(sb, x_q, kwargs, o.batch_size, o.dtype,
                                 None if deadline is None else self._time_left(deadline) - f_t)
            if x_q is None:  # no time left for the next block's teacher pass after it
                return self._skip_blocks(max(i + 1, first), total)
            f_s = time.perf_counter() - t0
            x_fp = y_fp
            if self.progress:
                self.progress("blocks", i + 1, total, None)
        if self.progress:
            self.progress("blocks", total, total, None)

    def _block_time(self, deadline: float | None, i: int, first: int, total: int, forward: float,
                    owed: float = 0.0) -> float:
        """Seconds left to train block `i` (from an even split of the time left after `owed` seconds
        of work due first) beyond its forward passes and one step; <= 0: it does not fit."""
        if deadline is None:
            return math.inf
        left = self._time_left(deadline) - owed
        if i < first:  # done before a resume: only run again
            return left - forward
        return left / (total - i) - forward - self._block_step_seconds

    def _skip_blocks(self, first: int, total: int) -> None:
        """The budget's block share is spent: blocks `first`.. stay as they are."""
        self.state["blocks_skipped"] = self.state.get("blocks_skipped", 0) + max(0, total - first)
        self.state["block"] = total
        if self.progress:
            self.progress("blocks", total, total, None)

    def _train_block(self, index: int, block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict,
                     seconds: float | None) -> int:
        """Up to `block_steps` steps; with `seconds`, a step that would end past them is not started.
        Return the steps taken (-1: nothing to train in this block)."""
        o = self.opts
        params = {n: p for n, p in self.params.items() if any(p is q for q in block.parameters())}
        if not params:
            return -1
        opt = _optimizer(params, o.block_lr, o.scale_lr)
        var = y.var().clamp_min(1e-12)
        start = time.perf_counter()
        logged, loss = -1, None
        for step in range(o.block_steps):
            if seconds is not None and time.perf_counter() - start + self._block_step_seconds > seconds:
                break
            t0 = time.perf_counter()
            idx = _batch(len(x), o.batch_size, o.seed, 1 + index, step, self.device)
            with autocast(o.dtype, self.device):
                out = _run_block(block, x[idx], kwargs)
            loss = ((out.float() - y[idx]) ** 2).mean() / var
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or step == o.block_steps - 1 or step % 10 == 9:
                self._log(phase="blocks", block=index, step=step, loss=loss.item())
                logged = step
            self._block_step_seconds = time.perf_counter() - t0
        else:
            return o.block_steps
        if loss is not None and logged != step - 1:
            self._log(phase="blocks", block=index, step=step - 1, loss=loss.item())
        return step

    def _cached_topk(self) -> dict[str, torch.Tensor] | None:
        """The stored teacher cache when it covers a prefix of these windows (maybe all of them)."""
        from safetensors.torch import load_file

        path = self.teacher_cache_path
        if not path.is_file():
            return None
        cache = load_file(str(path))
        shape = cache["logprobs"].shape
        if shape[1] != self.windows.shape[1] or shape[0] > len(self.windows) or shape[2] != self.opts.top_k:
            return None
        return {k: v.to(self.device) for k, v in cache.items()}

    @staticmethod
    def _cache_size(cache: dict[str, torch.Tensor] | None) -> int:
        return 0 if cache is None else len(cache["tail"])

    def _cache_target(self) -> int:
        """The windows the end-to-end phase trains on: all, or those a resumed run started with."""
        return self.state.get("e2e_windows", len(self.windows))

    def _teacher_cache(self, teacher: nn.Module | None, cache: dict[str, torch.Tensor] | None
                       ) -> dict[str, torch.Tensor] | None:
        """The teacher cache over the end-to-end windows, completed within the phase's share of the
        budget (a resumed run completes the windows it started with regardless); None: no window."""
        from safetensors.torch import save

        deadline = self._deadline("teacher_cache")
        have, target = self._cache_size(cache), self._cache_target()
        if have < target:
            left = None if "e2e_windows" in self.state or deadline is None else (lambda: self._time_left(deadline))
            with autocast(self.opts.dtype, self.device):
                more = teacher_topk(teacher, self.windows[have:target], self.opts.top_k, self.opts.batch_size,
                                    self.progress, left, offset=have, total=target)
            if len(more["tail"]):
                cache = more if cache is None else {k: torch.cat([cache[k], more[k]]) for k in cache}
                self.teacher_cache_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(self.teacher_cache_path, "wb") as f:
                    f.write(save({k: v.cpu().contiguous() for k, v in cache.items()}))
        if cache is not None:
            cache = {k: v[:target] for k, v in cache.items()}
        self.state["e2e_windows"] = self._cache_size(cache)
        return cache

    def end_to_end(self, cache: dict[str, torch.Tensor]) -> None:
        o = self.opts
        n = self._cache_size(cache)
        if self.optimizer is None:
            self.optimizer = _optimizer(self.params, o.lr, o.scale_lr)
        deadline = self._deadline("e2e")
        start = self.state.setdefault("e2e_start", self.elapsed)
        last = 0.0  # seconds of the last step, to tell whether another one fits
        for step in range(self.state["step"], o.steps):
            if deadline is not None and self.elapsed + last > deadline:
                break
            t0 = time.perf_counter()
            # Progress through the schedule: by steps, or by time when the budget ends the run first.
            done = step / o.steps if deadline is None else max(
                step / o.steps, (self.elapsed - start) / max(1e-6, deadline - start))
            for group, base in zip(self.optimizer.param_groups, (o.lr, o.scale_lr)):
                group["lr"] = base * _cosine(step, done)
            idx = _batch(n, o.batch_size, o.seed, 0, step, self.device)
            with autocast(o.dtype, self.device):
                logits = self.student(self.windows[idx], use_cache=False).logits
            loss = kl_loss(logits, {k: v[idx] for k, v in cache.items()})
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state["step"] = step + 1
            self._log(phase="e2e", step=step, loss=loss.item())
            fault_point("recover:step")
            if self.progress:
                self.progress("e2e", step + 1, o.steps, loss.item())
            if (step + 1) % o.checkpoint_every == 0:
                self.checkpoint()
            if o.snapshot_every and self.elapsed >= self.state.get("next_snapshot", o.snapshot_every):
                self.snapshot()
            last = time.perf_counter() - t0


def _cosine(step: int, done: float, warmup: int = 5) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1 as `done` goes from 0 to 1."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def kl_on_windows(student: nn.Module, windows: torch.Tensor, cache: dict[str, torch.Tensor],
                  batch_size: int = 4) -> float:
    """Mean top-k KL of the student to the cached teacher over windows (for reports and tests), on
    the student's device."""
    param = next(student.parameters(), None)
    device = windows.device if param is None else param.device
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            part = {k: v[i:i + batch_size].to(device) for k, v in cache.items()}
            logits = student(windows[i:i + batch_size].to(device), use_cache=False).logits
            total += kl_loss(logits, part).item() * len(part["tail"])
            n += len(part["tail"])
    return total / n

