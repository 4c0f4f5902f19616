"""`workbench zoo build` / `workbench zoo status`: the default zoo of the merge search.

The zoo is the small twin of Sakana's "Japanese LM + math LM -> Japanese math": a base model
(SmolLM2-135M-Instruct) and two experts fine-tuned from it on distinct skills that a third
task needs both of:

- ``zoo-expert-arith``: two-digit addition and subtraction, answered in digits;
- ``zoo-expert-french``: numbers written out in French words;
- the combined task (``zoo-arith-french``): arithmetic answered in French words.

Each expert is a float32 safetensors model directory in ``$WORKBENCH_HOME/models/`` with a
``train.json`` (seeds, hyper-parameters, trained tensors, data sizes, wall time, loss curve).
A build trains only what is missing; a training run checkpoints every few steps into
``$WORKBENCH_HOME/zoo/work/<expert>/`` and resumes from there after an interruption.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench.errors import WorkbenchError
from workbench.locks import file_lock
from workbench.home import DEFAULT_MODEL_NAME, models_dir, workbench_home
from workbench.zoo import generators as gen
from workbench.zoo.train import TrainConfig

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    skill: str          # a generators skill: "arith" or "french"
    description: str
    config: TrainConfig
    data_seed: int

    @property
    def num_examples(self) -> int:
        return self.config.steps * self.config.batch_size


# What is trained: attention and MLP projections of every decoder layer (106 M of the 134.5 M
# parameters); the 49152 x 576 tied embedding / head and the norms stay frozen.
TRAINABLE = ("self_attn.", "mlp.")

# Steps measured here (SmolLM2-135M-Instruct, batch 16, lr 2e-4, held-out multiple choice, base
# 39% / 26%): arithmetic 72% after 40 steps and 83% after 80; French words 87% after 40 steps.
EXPERTS: dict[str, ExpertSpec] = {
    "zoo-expert-arith": ExpertSpec(
        name="zoo-expert-arith", skill="arith",
        description="SmolLM2-135M-Instruct fine-tuned on two-digit addition and subtraction answered in digits",
        config=TrainConfig(steps=100, batch_size=16, lr=2e-4, warmup_steps=10, seed=1, trainable=TRAINABLE,
                           checkpoint_every=20),
        data_seed=11),
    "zoo-expert-french": ExpertSpec(
        name="zoo-expert-french", skill="french",
        description="SmolLM2-135M-Instruct fine-tuned on writing numbers (0-999) in French words",
        config=TrainConfig(steps=60, batch_size=16, lr=2e-4, warmup_steps=10, seed=2, trainable=TRAINABLE,
                           checkpoint_every=20),
        data_seed=12),
}


def expert_dir(name: str) -> Path:
    return models_dir() / name


def work_dir(name: str) -> Path:
    return workbench_home() / "zoo" / "work" / name


def is_built(name: str) -> bool:
    d = expert_dir(name)
    return (d / "train.json").is_file() and (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def _lock(name: str):
    """One build of an expert at a time (a second `zoo build` waits, then finds it built)."""
    return file_lock(work_dir(name).parent / f".{name}.lock")


def _fingerprint(spec: ExpertSpec, base: Path) -> dict:
    """What a checkpoint must match to be resumed: the spec and the base weights' identity."""
    st = (base / "model.safetensors").stat() if (base / "model.safetensors").is_file() else None
    return {"format": FORMAT_VERSION, "skill": spec.skill, "data_seed": spec.data_seed,
            "partition_seed": gen.PARTITION_SEED, "base_size": st.st_size if st else None}


def _save_expert(model, spec: ExpertSpec, base: Path, record: dict) -> Path:
    """Write the expert as a float32 model directory with the base's tensor names and files."""
    import torch
    from safetensors.torch import save_file

    from workbench.atomic import atomic_dir
    from workbench.models.checkpoint import ModelDir

    state = model.state_dict()
    with ModelDir(base) as ref:
        names = ref.tensor_names()
        tensors = {n: state[n].detach().to("cpu", torch.float32).contiguous().clone() for n in names}
    out = expert_dir(spec.name)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in COPIED_FILES:
            if (base / f).is_file():
                shutil.copy2(base / f, tmp / f)
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {spec.name}\n\n{spec.description}.\n\nBuilt by `workbench zoo build` from {DEFAULT_MODEL_NAME}; "
            f"`train.json` records the data, seeds, hyper-parameters and loss curve.\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is for everyone to read
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def pick_threads(requested: int | None = None) -> int:
    """Torch threads for training: as asked, else the cores the machine's load leaves free.

    On a CPU that other jobs keep busy, two OpenMP threads are far slower than one (each
    parallel region waits for the thread that was descheduled: measured here, a training step
    of SmolLM2-135M took 60-85 s with 2 threads and 14-23 s with 1 under a load of 9).
    """
    if requested:
        return max(1, requested)
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def train_expert(spec: ExpertSpec, base: Path, on_step: Callable[[int, int, float], None] | None = None,
                 stop_after: int | None = None, threads: int | None = None, device="cpu") -> Path | None:
    """Train one expert on `device` (a torch.device or its name; resuming from its checkpoint) and
    save it from the CPU; None if stopped early."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from workbench.models.loader import load_model
    from workbench.zoo.train import train

    t0 = time.time()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    torch.set_num_threads(pick_threads(threads))
    hf_logging.disable_progress_bar()
    model, tok = load_model(base)
    device = torch.device(device)
    model.to(device)
    examples = gen.training_examples(spec.skill, spec.num_examples, spec.data_seed)
    pairs = [(e.prompt, e.answer) for e in examples]
    wd = work_dir(spec.name)
    wd.mkdir(parents=True, exist_ok=True)
    result = train(model, tok, pairs, spec.config, checkpoint=wd / "checkpoint.pt", on_step=on_step,
                   fingerprint=_fingerprint(spec, base), stop_after=stop_after)
    model.to("cpu")
    if result.steps < spec.config.steps:
        return None
    pool = len(gen.arithmetic_parts()["train"] if spec.skill == "arith" else gen.number_parts()["train"])
    record = {
        "name": spec.name, "description": spec.description, "base_model": DEFAULT_MODEL_NAME,
        "skill": spec.skill,
        "example": {"prompt": examples[0].prompt, "answer": examples[0].answer},
        "seeds": {"train": spec.config.seed, "data_order": spec.data_seed, "partition": gen.PARTITION_SEED},
        "hyperparameters": spec.config.to_json(),
        "trained_tensors": {"patterns": list(spec.config.trainable), "layers": spec.config.layers or "all",
                            "count": len(result.trainable), "parameters": result.trainable_params,
                            "frozen_parameters": sum(p.numel() for p in model.parameters()) - result.trainable_params,
                            "frozen_outside_layers": [n for n, _ in model.named_parameters()
                                                      if n not in set(result.trainable) and ".layers." not in n]},
        "steps": result.steps,
        "data": {"examples_seen": len(pairs), "unique_examples_seen": len({p for p, _ in pairs}),
                 "training_pool": pool, "reserved_for_tasks": gen.ARITH_RESERVED if spec.skill == "arith"
                 else gen.NUMBER_RESERVED, "loss": "cross-entropy on answer tokens and <|im_end|> only",
                 "format": "chat template, one user turn, no delimiter before the answer"},
        "wall_seconds": {"training": round(result.seconds, 1), "this_session": round(time.time() - t0, 1)},
        "resumed_from_step": result.resumed_from,
        "loss_curve": [round(x, 5) for x in result.losses],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "device": device.type,
        "load_average_at_start": load_at_start,
    }
    out = _save_expert(model, spec, base, record)
    shutil.rmtree(wd, ignore_errors=True)
    return out


def zoo_status() -> list[dict]:
    from workbench.models.default_model import default_dir_for, is_complete

    base = default_dir_for("float32")
    rows = [{"name": DEFAULT_MODEL_NAME, "role": "base", "state": "built" if is_complete(base) else "missing",
             "path": str(base)}]
    for spec in EXPERTS.values():
        row = {"name": spec.name, "role": f"{spec.skill} expert", "path": str(expert_dir(spec.name)),
               "steps": spec.config.steps}
        if is_built(spec.name):
            rec = json.loads((expert_dir(spec.name) / "train.json").read_text())
            row.update(state="built", wall_seconds=rec.get("wall_seconds", {}).get("training"),
                       final_loss=round(sum(rec["loss_curve"][-10:]) / max(len(rec["loss_curve"][-10:]), 1), 4))
        elif (work_dir(spec.name) / "checkpoint.pt").is_file():
            from workbench.models.checkpoint import load_training_state

            state = load_training_state(work_dir(spec.name) / "checkpoint.pt")
            row.update(state=f"partial ({state['step']}/{spec.config.steps} steps)")
        else:
            row["state"] = "missing"
        rows.append(row)
    return rows
