"""Loading and saving models: safetensors directories and GGUF imports.

Names are imported on first use, so that ``workbench.models.default_model``'s fast path
(the model is already prepared) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelDir": "workbench.models.checkpoint",
    "ModelLoadError": "workbench.models.checkpoint",
    "layer_index": "workbench.models.checkpoint",
    "rename_layer": "workbench.models.checkpoint",
    "import_gguf": "workbench.models.gguf_import",
    "prepare_default": "workbench.models.default_model",
    "model_info": "workbench.models.info",
    "list_models": "workbench.models.info",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
