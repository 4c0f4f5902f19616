"""Seeded variants of a model: the model plus a random sparse task vector per tensor.

They stand in for fine-tuned relatives when demonstrating and benchmarking merges: same
architecture and tensor names, different weights. Each variant is written atomically,
tensor by tensor, and records its seed, density and scale in ``variant.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from workbench.atomic import atomic_dir
from workbench.models.checkpoint import ModelDir
from workbench.models.safetensors_io import StreamingShardWriter

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def sparse_task_vector(shape: tuple[int, ...], density: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian entries of std ``scale`` on a random ``density`` fraction of positions, zero elsewhere."""
    mask = torch.rand(shape, generator=generator) < density
    return torch.randn(shape, generator=generator) * scale * mask


def make_variant(base_dir: str | Path, out_dir: str | Path, seed: int, density: float = 0.1,
                 relative_scale: float = 0.2) -> Path:
    """Write ``base + task vector`` where each tensor's noise std is ``relative_scale`` times its own std."""
    base = ModelDir(base_dir)
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    specs = [(n, base.dtype(n), base.shape(n)) for n in base.tensor_names()]
    with atomic_dir(out_dir) as tmp:
        writer = StreamingShardWriter(tmp / "model.safetensors", specs)
        for name, dtype, shape in specs:
            w = base.get_tensor(name).float()
            std = w.std().item() if w.numel() > 1 else 0.0
            writer.write(name, (w + sparse_task_vector(shape, density, relative_scale * std, g)).to(dtype))
        writer.close()
        for f in COPIED_FILES:
            if (base.path / f).is_file():
                shutil.copy2(base.path / f, tmp / f)
        (tmp / "variant.json").write_text(json.dumps(
            {"base": str(base.path), "seed": seed, "density": density, "relative_scale": relative_scale}, indent=2))
    base.close()
    return out_dir


def ensure_variants(base_dir: str | Path, names: list[str], first_seed: int = 1, **kwargs) -> list[Path]:
    """Variants beside ``base_dir`` named ``<base>-<name>``, made once with seeds first_seed, first_seed+1, ..."""
    base_dir = Path(base_dir)
    paths = []
    for i, name in enumerate(names):
        path = base_dir.with_name(f"{base_dir.name}-{name}")
        if not (path / "model.safetensors").is_file():
            make_variant(base_dir, path, seed=first_seed + i, **kwargs)
        paths.append(path)
    return paths
