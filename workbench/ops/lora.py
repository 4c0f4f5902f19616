"""LoRA extraction: `workbench extract-lora BASE FINETUNED --rank R --out DIR`, as
``mergekit-extract-lora`` does it.

Each linear layer's delta ``FINETUNED - BASE`` (out x in) is cut to its ``R`` largest singular
values, ``delta ~ U_R S_R V_R^T``, and the singular values split evenly between the factors
(mergekit's default ``--distribute-scale``): ``lora_A = sqrt(S_R) V_R^T`` (R x in), ``lora_B = U_R
sqrt(S_R)`` (out x R). The adapter's ``lora_alpha`` equals its ``r`` (and ``alpha_pattern`` its
``rank_pattern``: a layer smaller than R gets its full rank), so peft's scale is 1 and
``W_base + B @ A`` is the extracted layer. As in mergekit:

- the layers decomposed are the model's ``nn.Linear`` modules (found by building the model from
  its config on the meta device); a transformers ``Conv1D`` (GPT-2) is decomposed too, transposed,
  with peft's ``fan_in_fan_out`` (mergekit saves those at full rank);
- the input and output embeddings (and any ``nn.Embedding``) are saved at full rank, the
  finetuned's weights, in ``modules_to_save`` (mergekit's default, without ``--embed-lora``);
- every other module with weights (norms) is saved at full rank in ``modules_to_save``, or left
  out with ``skip_undecomposable`` (mergekit's ``--skip-undecomposable``);
- the bias deltas of decomposed layers are ``lora_B.bias`` with peft's ``lora_bias`` when every
  decomposed layer has a bias (GPT-2); when only some have one (Qwen2's q/k/v) peft cannot hold
  them and they are left out, named in the result (mergekit writes them, and peft ignores them).

The result reports, per decomposed layer and overall, ``||delta - B A||_F / ||delta||_F``,
computed from the factors as written. The output directory (``adapter_config.json``,
``adapter_model.safetensors``, ``README.md``) is written atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit


@dataclass(frozen=True)
class LayerError:
    name: str                 # module name, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]    # the weight's (out, in)
    rank: int
    rel_error: float          # ||delta - BA||_F / ||delta||_F (0 for an unchanged layer)
    delta_norm: float


@dataclass(frozen=True)
class LoraExtraction:
    out: Path
    rank: int                              # the adapter's r (the largest layer rank)
    layers: list[LayerError]
    rel_error: float                       # over every decomposed layer together
    modules_to_save: list[str] = field(default_factory=list)   # saved at full rank
    skipped: list[str] = field(default_factory=list)           # undecomposable, left out
    dropped_biases: list[str] = field(default_factory=list)    # bias deltas peft cannot hold here
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"rank {self.rank}: {len(self.layers)} layers, relative error {self.rel_error:.3g}, "
                f"{len(self.modules_to_save)} modules at full rank")


DECOMPOSED = ("Linear", "Conv1D")


def _open(ref: str | Path, what: str):
    from workbench.models.checkpoint import ModelLoadError
    from workbench.models.lora import open_model_dir, resolve_ref

    try:
        return open_model_dir(resolve_ref(str(ref)))
    except ModelLoadError as e:
        raise WorkbenchError(f"{what} {ref}: {e}") from None


def extract_lora(base: str | Path, finetuned: str | Path, rank: int, out: str | Path, *, device: str = "cpu",
                 skip_undecomposable: bool = False, overwrite: bool = False, source: str | None = None,
                 progress: ProgressFn | None = None) -> LoraExtraction:
    """`workbench extract-lora`: the peft LoRA adapter of rank ``rank`` that takes ``base`` nearest
    to ``finetuned`` (each a model reference, ``BASE+ADAPTER`` too), written to ``out``;
    ``source``: what the adapter's README says it was extracted from (default: ``finetuned``)."""
    from safetensors.torch import save_file

    from workbench.atomic import atomic_dir, check_output
    from workbench.merge.executor import check_device
    from workbench.models.lora import module_types

    start = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WorkbenchError(f"--rank: expected a positive integer, got {rank!r}")
    check_output(out, overwrite)
    dev = check_device(device)
    b = _open(base, "base model")
    try:
        f = _open(finetuned, "finetuned model")
    except BaseException:
        b.close()
        raise
    try:
        if b.architecture != f.architecture:
            raise WorkbenchError(f"{finetuned}: a {f.architecture}, but the base {base} is a {b.architecture}")
        types = module_types(str(f.path))
        if not types:
            raise WorkbenchError(f"{f.path}: transformers cannot build this architecture ({f.architecture}) from "
                                 "its config, so its linear layers are unknown")
        embeddings = {types.get("<input_embeddings>"), types.get("<output_embeddings>")} - {None}
        decompose, full, skipped = [], [], []
        for name, kind in types.items():
            if name.startswith("<") or f"{name}.weight" not in f:
                continue
            if name in embeddings or kind == "Embedding":
                full.append(name)
            elif kind in DECOMPOSED:
                decompose.append(name)
            elif skip_undecomposable:
                skipped.append(name)
            else:
                full.append(name)
        for name in decompose + full:
            for t in (f"{name}.weight", f"{name}.bias"):
                if t in f and t not in b:
                    raise WorkbenchError(f"{base}: has no tensor {t}, which {finetuned} has")
                if t in f and b.shape(t) != f.shape(t):
                    raise WorkbenchError(f"{t}: shape {list(f.shape(t))} in {finetuned}, {list(b.shape(t))} in the "
                                         f"base {base} (different vocabularies or sizes cannot be extracted)")
        with_bias = [n for n in decompose if f"{n}.bias" in f]
        lora_bias = bool(with_bias) and len(with_bias) == len(decompose)
        conv1d = any(types[n] == "Conv1D" for n in decompose)
        out_dtype = f.dtype(f"{decompose[0]}.weight") if decompose else torch.float32

        tensors: dict[str, torch.Tensor] = {}
        layers: list[LayerError] = []
        dropped: list[str] = []
        total = len(decompose) + len(full)
        sq_err = sq_norm = 0.0
        for i, name in enumerate(decompose):
            w = f"{name}.weight"
            delta = (f.get_tensor(w).to(dev, torch.float32) - b.get_tensor(w).to(dev, torch.float32))
            transpose = types[name] == "Conv1D"
            if transpose:
                delta = delta.T
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.shape[0])
            root = s[:r].sqrt()
            a = (root[:, None] * vh[:r]).to(out_dtype).contiguous()
            bb = (u[:, :r] * root[None, :]).to(out_dtype).contiguous()
            err = float(torch.linalg.matrix_norm(delta - bb.float() @ a.float()))
            norm = float(torch.linalg.matrix_norm(delta))
            sq_err, sq_norm = sq_err + err ** 2, sq_norm + norm ** 2
            layers.append(LayerError(name, tuple(delta.shape), r, err / norm if norm else 0.0, norm))
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = bb.cpu()
            if f"{name}.bias" in f:
                db = f.get_tensor(f"{name}.bias").float() - b.get_tensor(f"{name}.bias").float()
                if lora_bias:
                    tensors[f"base_model.model.{name}.lora_B.bias"] = db.to(out_dtype).contiguous()
                elif bool(db.abs().max() > 0):
                    dropped.append(f"{name}.bias")
            del delta, u, s, vh
            emit(progress, "extract", i + 1, total, name)
        for j, name in enumerate(full):
            for t in (f"{name}.weight", f"{name}.bias"):
                if t in f:
                    tensors[f"base_model.model.{t}"] = f.get_tensor(t).contiguous().clone()
            emit(progress, "extract", len(decompose) + j + 1, total, name)

        ranks = {lay.name: lay.rank for lay in layers}
        r_max = max(ranks.values(), default=rank)
        pattern = {n: r for n, r in ranks.items() if r != r_max}
        short = {n.rsplit(".", 1)[-1] for n in decompose}
        others = {n.rsplit(".", 1)[-1] for n in types if not n.startswith("<") and n not in decompose}
        targets = sorted(short) if not short & others else sorted(decompose)
        tied = bool(f.config.get("tie_word_embeddings")) and len(embeddings) == 2 and not all(
            f"{n}.weight" in f for n in embeddings)
        config = {"base_model_name_or_path": b.source_id, "peft_type": "LORA",
                  "task_type": "CAUSAL_LM", "use_rslora": False, "target_modules": targets,
                  "modules_to_save": full or None, "r": r_max, "lora_alpha": r_max,
                  "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
                  "fan_in_fan_out": conv1d, "lora_bias": lora_bias, "bias": "none", "inference_mode": True}
        if tied and types["<input_embeddings>"] in full:
            # the head is tied to the embeddings saved whole: peft ties its copy too, and reads it
            config["ensure_weight_tying"] = True
            embed, head = types["<input_embeddings>"], types["<output_embeddings>"]
            tensors[f"base_model.model.{head}.weight"] = tensors[f"base_model.model.{embed}.weight"].clone()
        overall = math.sqrt(sq_err / sq_norm) if sq_norm else 0.0
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "README.md").write_text(
                f"# LoRA adapter extracted by workbench\n\nBase: `{config['base_model_name_or_path']}`  \n"
                f"Finetuned: `{source or f.source_id}`  \nRank {r_max}, {len(layers)} layers decomposed "
                f"(relative error {overall:.4g}), {len(full)} modules saved at full rank.\n\n"
                "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, PATH)\n```\n")
    finally:
        b.close()
        f.close()
    return LoraExtraction(Path(out), r_max, layers, overall, full, skipped, dropped,
                          time.perf_counter() - start)
