"""Quantize a transformers model in place, and save / load it as a compressed safetensors directory.

Directory layout (`save_quantized`):

    config.json, tokenizer files, generation_config.json   as in the source model
    quant_config.json    {"format": "workbench.quant", "version": 1, "config": {...},
                          "layers": {module: {kind, bits, group_size, in_features, out_features,
                                              bias, lora_rank, lora_alpha, storage}}, "tied": [...]}
    model.safetensors    float tensors by their usual names; per quantized module M:
                         M.qweight (uint8, block-64 layout, or 5 trits per byte when storage is
                         "trits"), M.scale and M.zero (float16), M.lora_A and M.lora_B (float16),
                         M.bias (float32)

`load_quantized` rebuilds the model from config.json and gives identical logits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.atomic import atomic_dir
from workbench.faults import fault_point
from workbench.errors import WorkbenchError
from workbench.quant import packing
from workbench.quant.config import QuantConfig, check_model
from workbench.quant.embeddings import BFloat16Embedding, cast_embeddings
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import quantize_weight

FORMAT = "workbench.quant"
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class QuantizedModelError(WorkbenchError, ValueError):
    """A compressed model directory that cannot be read."""


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every `nn.Linear` (and GPT-2 style `Conv1D`) of a model, by module name."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def float_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or Conv1D (which stores [in, out])."""
    return module.weight.detach().t() if type(module).__name__ == "Conv1D" else module.weight.detach()


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantize_model(model: nn.Module, cfg: QuantConfig,
                   progress: Callable[[str, int, int], None] | None = None,
                   device: torch.device | str | None = None) -> dict[str, QuantLinear]:
    """Replace every linear layer the config selects by a `QuantLinear` (with LoRA if configured).

    Each weight's solve (HQQ, LSQ, ...) runs on `device` (None: where the weight is), one layer at a
    time; codes, scales and zeros then come back to the layer's device, and the adapters are
    initialised there from a CPU generator, so the result does not depend on `device` beyond float
    rounding. Settings are checked against every layer before any weight is quantized."""
    linears = linear_layers(model)
    shapes = {n: tuple(float_weight(m).shape) for n, m in linears.items()}
    settings = check_model(cfg, shapes)
    done = {}
    for i, (name, s) in enumerate(settings.items()):
        module = linears[name]
        w = float_weight(module).float()
        home = w.device
        q = quantize_weight(w if device is None else w.to(device), s.nominal_bits, s.group_size, s.method).to("cpu")
        bias = getattr(module, "bias", None)
        ql = QuantLinear.from_quantized(q, None if bias is None else bias.detach().cpu(), s.rank, cfg.lora.alpha)
        ql.init_lora(cfg.lora.init, w.cpu(), seed=cfg.seed + i)  # CPU: svd_lowrank's random draws are the CPU's
        ql.round_to_storage_()
        ql.to(home)
        set_module(model, name, ql)
        done[name] = ql
        if progress:
            progress(name, i + 1, len(settings))
    cast_embeddings(model, cfg.embeddings)
    return done


def quantized_copy(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A quantized copy of `model` (left as it is, on its device): what a joint merge x quantization
    search scores."""
    import copy

    out = copy.deepcopy(model)
    quantize_model(out, cfg)
    return out.eval()


def model_to_cpu(model: nn.Module) -> nn.Module:
    """`model` moved to the CPU in place (what every save writes from); drops cached unpacked codes."""
    model.to("cpu")
    for m in quant_layers(model).values():
        m._codes = None
    return model


def layer_entry(m: QuantLinear, storage: str) -> dict:
    return {"kind": m.kind, "bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
            "out_features": m.out_features, "bias": m.bias is not None, "lora_rank": m.lora_rank,
            "lora_alpha": m.lora_alpha, "storage": storage if m.kind == "ternary" else "packed"}


def quantized_state(model: nn.Module, storage: str = "packed") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to save (tied duplicates dropped, listed apart) in their storage form."""
    qlayers = quant_layers(model)
    tensors, tied, seen = {}, [], {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in qlayers:
            m = qlayers[module]
            if leaf == "qweight" and m.kind == "ternary" and storage == "trits":
                t = packing.pack_trits(m.codes())
            elif leaf in ("scale", "zero", "lora_A", "lora_B"):
                t = t.half()
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else None
        if key is not None and key in seen and leaf not in ("qweight",):
            tied.append(name)
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, tied


def save_quantized(model: nn.Module, out: str | Path, source_dir: str | Path | None = None,
                   cfg: QuantConfig | None = None, storage: str | None = None, overwrite: bool = False,
                   extra: dict | None = None) -> Path:
    """Write the compressed directory atomically (a temporary directory renamed into place); an
    existing file or non-empty directory at `out` is refused unless `overwrite`."""
    storage = storage or (cfg.storage if cfg else "packed")
    for m in quant_layers(model).values():
        m.round_to_storage_()
    tensors, tied = quantized_state(model, storage)
    embeddings = "bfloat16" if isinstance(model.get_input_embeddings(), BFloat16Embedding) else "float32"
    meta = {"format": FORMAT, "version": 1, "config": cfg.to_dict() if cfg else None, "embeddings": embeddings,
            "layers": {n: layer_entry(m, storage) for n, m in quant_layers(model).items()},
            "tied": tied, **(extra or {})}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if source_dir is not None:
            for f in COPY_FILES:
                if (Path(source_dir) / f).is_file():
                    shutil.copy2(Path(source_dir) / f, tmp / f)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "workbench": FORMAT})
        fault_point("quantized:tensors")
        (tmp / "quant_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def read_quant_meta(qdir: str | Path) -> dict:
    path = Path(qdir) / "quant_config.json"
    if not path.is_file():
        raise QuantizedModelError(f"{qdir}: not a quantized model directory (no quant_config.json); "
                                  "create one with `workbench quantize`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise QuantizedModelError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def empty_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized(qdir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the quantized model (QuantLinear layers, adapters) from a compressed directory."""
    qdir = Path(qdir)
    meta = read_quant_meta(qdir)
    model = empty_model(qdir, dtype)
    cast_embeddings(model, meta.get("embeddings", "float32"))
    for name, e in meta["layers"].items():
        set_module(model, name, QuantLinear(e["in_features"], e["out_features"], e["kind"], e["bits"],
                                            e["group_size"], e["bias"], e["lora_rank"], e["lora_alpha"]))
    tensors = load_file(str(qdir / "model.safetensors"))
    for name, e in meta["layers"].items():
        if e["storage"] == "trits":
            codes = packing.unpack_trits(tensors[f"{name}.qweight"], e["in_features"])
            tensors[f"{name}.qweight"] = packing.pack_2bit(codes, pad=1)
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(meta.get("tied", []))
    missing = {k for k in missing if not k.endswith("inv_freq")}
    if missing or result.unexpected_keys:
        raise QuantizedModelError(f"{qdir / 'model.safetensors'}: missing tensors {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:5]}")
    if meta.get("tied"):
        model.tie_weights()
    return model.eval()


def size_report(model: nn.Module, storage: str = "packed") -> dict:
    """Bits per weight of the quantized linear layers, counted from the bytes actually stored."""
    qlayers = quant_layers(model)
    tensors, _ = quantized_state(model, storage)
    weights = sum(m.in_features * m.out_features for m in qlayers.values())
    base_bytes = adapter_bytes = other_bytes = 0
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        nbytes = t.numel() * t.element_size()
        if module in qlayers and leaf in ("qweight", "scale", "zero"):
            base_bytes += nbytes
        elif module in qlayers and leaf in ("lora_A", "lora_B"):
            adapter_bytes += nbytes
        else:
            other_bytes += nbytes
    return {"quantized_layers": len(qlayers), "quantized_weights": weights,
            "bits_per_weight": 8 * base_bytes / max(weights, 1),
            "bits_per_weight_with_adapters": 8 * (base_bytes + adapter_bytes) / max(weights, 1),
            "adapter_params": sum(m.lora_rank * (m.in_features + m.out_features) for m in qlayers.values()),
            "linear_bytes": base_bytes, "adapter_bytes": adapter_bytes, "other_bytes": other_bytes,
            "total_bytes": base_bytes + adapter_bytes + other_bytes}
