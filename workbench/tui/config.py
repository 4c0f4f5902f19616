"""The UI's settings: ``$WORKBENCH_HOME/config.toml`` (or ``config.yml``), with defaults when absent.

::

    theme = "textual-dark"        # any Textual theme (ctrl+p, "theme" lists them)
    runs_dir = "~/.cache/workbench/runs"   # where searches are created and listed
    threads = 0                   # torch CPU threads for background work (0: torch's default)
    backend = "local"             # search backend: local | processes
    workers = 2                   # worker processes for backend = "processes"
    device = "auto"               # where searches, Quantize and Export compute: auto (CUDA when
                                  # present) | cpu | cuda | cuda:N; Quantize, Quant search and Export have a selector

A file that does not parse, an unknown key or a bad value is reported (a notification at start)
and the default is used instead; the UI always starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from workbench.home import workbench_home

try:
    import tomllib
except ImportError:  # Python 3.10: tomli if present, else config.yml only
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

CONFIG_NAMES = ("config.toml", "config.yml", "config.yaml")
BACKENDS = ("local", "processes")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
KEYS = ("theme", "runs_dir", "threads", "backend", "workers", "device")


def is_device_name(value: object) -> bool:
    """A device the settings may name: auto, cpu, cuda or cuda:N (whether it is present is checked
    when a job resolves it, with `workbench.devices.resolve_device`)."""
    if not isinstance(value, str):
        return False
    kind, _, index = value.partition(":")
    return value in DEVICES or (kind == "cuda" and index.isdigit())


@dataclass
class TuiConfig:
    theme: str = "textual-dark"
    runs_dir: Path = field(default_factory=lambda: workbench_home() / "runs")
    threads: int = 0
    backend: str = "local"
    workers: int = 2
    device: str = "auto"
    path: Path | None = None  # the file read, if any
    warnings: list[str] = field(default_factory=list)


def config_path(home: Path | None = None) -> Path | None:
    home = Path(home) if home is not None else workbench_home()
    return next((home / n for n in CONFIG_NAMES if (home / n).is_file()), None)


def load_config(home: Path | None = None) -> TuiConfig:
    """Read the config file of the workbench home; defaults for whatever is absent or wrong."""
    home = Path(home) if home is not None else workbench_home()
    cfg = TuiConfig(runs_dir=home / "runs")
    path = config_path(home)
    if path is None:
        return cfg
    cfg.path = path
    if path.suffix == ".toml" and tomllib is None:
        cfg.warnings.append(f"{path}: reading TOML needs Python 3.11 or tomli; use config.yml, or the defaults apply")
        return cfg
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (OSError, ValueError, yaml.YAMLError) as e:  # TOMLDecodeError is a ValueError
        cfg.warnings.append(f"{path}: cannot read it ({e}); using the defaults")
        return cfg
    if not isinstance(data, dict):
        cfg.warnings.append(f"{path}: expected a table of settings; using the defaults")
        return cfg
    for key, value in data.items():
        if key == "theme" and isinstance(value, str):
            cfg.theme = value
        elif key == "runs_dir" and isinstance(value, str) and value:
            p = Path(os.path.expandvars(value)).expanduser()
            cfg.runs_dir = p if p.is_absolute() else home / p
        elif key == "threads" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            cfg.threads = value
        elif key == "backend" and value in BACKENDS:
            cfg.backend = value
        elif key == "workers" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            cfg.workers = value
        elif key == "device" and is_device_name(value):
            cfg.device = value
        elif key == "device":
            cfg.warnings.append(f"{path}: device: bad value {value!r}; expected auto, cpu, cuda or cuda:N; "
                                "using auto")
        elif key in KEYS:
            cfg.warnings.append(f"{path}: {key}: bad value {value!r}; using the default")
        else:
            cfg.warnings.append(f"{path}: unknown key {key!r} (expected {', '.join(KEYS)})")
    return cfg


def device_choices(current: str) -> list[tuple[str, str]]:
    """The device selector's options (auto, cpu, cuda, and the configured cuda:N if any)."""
    names = list(DEVICES) + ([current] if current not in DEVICES else [])
    return [(f"device: {n}", n) for n in names]


def checked_device(device: str) -> str:
    """`device` resolved now (CUDA asked for where there is none: the one-line WorkbenchError),
    so a job never starts on a device it cannot have."""
    from workbench.devices import resolve_device

    return str(resolve_device(device))


def apply_threads(threads: int) -> None:
    """Set torch's CPU threads for background work (imports torch: call it from a worker)."""
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
