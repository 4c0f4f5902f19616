"""Loading and saving models: safetensors directories and GGUF imports."""

from workbench.models.checkpoint import ModelDir, ModelLoadError, layer_index, rename_layer

__all__ = ["ModelDir", "ModelLoadError", "layer_index", "rename_layer"]
