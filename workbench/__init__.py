"""workbench: model merging and extreme quantization for LLMs."""

__version__ = "0.1.0"
