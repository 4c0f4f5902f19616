"""Where the workbench keeps models, runs and its config (``WORKBENCH_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """``$WORKBENCH_HOME`` or ``~/.cache/workbench``; created on first use."""
    home = Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".cache" / "workbench")
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    path = workbench_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME
