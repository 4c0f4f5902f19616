"""Evolutionary search over per-layer quantization formats and adapter ranks."""
