"""The adapters as a peft LoRA adapter (safetensors) over the dequantized base model.

Writes ``OUT/adapter_config.json`` and ``OUT/adapter_model.safetensors``, and the base they apply
to, the dequantized weights without adapters, as a plain model directory ``OUT/base``:

    base = AutoModelForCausalLM.from_pretrained("OUT/base")
    model = peft.PeftModel.from_pretrained(base, "OUT")
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from workbench.atomic import atomic_dir
from workbench.faults import fault_point
from workbench.errors import WorkbenchError
from workbench.export.hf import _dir_bytes, dequantized_model, save_plain
from workbench.quant.model import quant_layers


def export_peft(qmodel: nn.Module, qdir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    layers = {n: m for n, m in quant_layers(qmodel).items() if m.lora_rank}
    if not layers:
        raise WorkbenchError(f"{qdir}: the model has no LoRA adapters to export (quantize with `lora: {{rank: N}}`)")
    # Mixed ranks (a searched config) go into peft's rank_pattern / alpha_pattern, keyed by module name.
    rank, alpha = (Counter(getattr(m, k) for m in layers.values()).most_common(1)[0][0]
                   for k in ("lora_rank", "lora_alpha"))
    rank_pattern = {n: m.lora_rank for n, m in layers.items() if m.lora_rank != rank}
    alpha_pattern = {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha}
    base = dequantized_model(qmodel, qdir, merge_adapters=False)
    conv1d = any(type(base.get_submodule(n)).__name__ == "Conv1D" for n in layers)
    tensors = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_plain(base, qdir, tmp / "base")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                  "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                  "target_modules": "(" + "|".join(re.escape(n) for n in sorted(layers)) + ")", "lora_dropout": 0.0,
                  "bias": "none", "fan_in_fan_out": conv1d, "inference_mode": True,
                  "base_model_name_or_path": str(out.absolute() / "base"),
                  "layers_to_transform": None, "modules_to_save": None}
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        fault_point("export:peft-config")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"format": "peft", "path": str(out), "adapters": len(layers), "bytes": _dir_bytes(out)}
