"""Dispatch to fused low-bit matmul kernels (`kernels/`), with the pure-torch path as the fallback.

`fused_matmul(layer, x)` returns x @ W.T for a `QuantLinear`'s quantized base weight (no bias, no
LoRA), or None when no kernel applies, in which case `QuantLinear` dequantizes and multiplies.

Kernels exist for 2-bit codes in the block-64 layout (2-bit asymmetric and ternary) and inputs of at
most `MAX_ROWS` rows (decode; prefill is left to dequantize + matmul):

* CPU: `kernels/cpu/lowbit.cpp`, a torch op compiled on first use with `torch.utils.cpp_extension`
  and cached under ``$WORKBENCH_HOME/kernels`` (15-60 s on 2 cores, once per source version).
* CUDA: `kernels/triton/lowbit.py`, imported only when an input is on a CUDA device.

``WORKBENCH_KERNELS=0`` turns both off. A kernel that cannot be built or imported is reported once
(a `RuntimeWarning`) and the pure-torch path is used from then on.

`kernel_path(kind, bits, group_size)` says which kernel a layer format dispatches to (None: unfused),
and `unfused_layers(model)` lists the layers that run unfused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# Rows (after flattening leading dims) up to which the kernels are used; above, dequantize + matmul.
# Measured on 2 cores: the CPU kernel beats dequantize + matmul at 64 rows for every benchmark shape
# (1.1x at 576x576 bf16, 5x at 4096x4096); at 128 rows it loses on SmolLM2-sized layers.
MAX_ROWS = 64
KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
CPU_SOURCE = KERNEL_DIR / "cpu" / "lowbit.cpp"
TRITON_SOURCE = KERNEL_DIR / "triton" / "lowbit.py"
# ISA-specific code carries its own `#pragma GCC target`, so no -march: the cache may be shared
CPU_CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_cpu: dict[str, Any] = {}  # "ops" once loaded, or "error"
_triton: dict[str, Any] = {}  # "module" once imported, or "error"
_EMPTY = torch.empty(0)


def enabled() -> bool:
    """False when ``WORKBENCH_KERNELS`` is 0/false/off/no."""
    return os.environ.get("WORKBENCH_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def kernel_cache_dir() -> Path:
    from workbench.home import workbench_home

    return workbench_home() / "kernels"


def _cpu_build_name() -> str:
    """Build name keyed by the source, flags, torch and Python, so a change never loads a stale build."""
    key = CPU_SOURCE.read_bytes() + repr((CPU_CFLAGS, torch.__version__, sys.version_info[:2])).encode()
    return "workbench_lowbit_" + hashlib.sha1(key).hexdigest()[:12]


def _build_cpu() -> Any:
    from torch.utils import cpp_extension

    name = _cpu_build_name()
    build_dir = kernel_cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():
        print(f"workbench: compiling the low-bit CPU kernels into {build_dir} (once; up to a minute)",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(CPU_SOURCE)], extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS,
                       build_directory=str(build_dir), is_python_module=False, verbose=False)
    return torch.ops.workbench_lowbit


def _report_unavailable(what: str, err: BaseException) -> None:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    warnings.warn(f"workbench: the low-bit {what} kernels are unavailable ({type(err).__name__}: {first_line}); "
                  "using the pure-torch dequantize + matmul path", RuntimeWarning, stacklevel=4)


def _load_once(state: dict[str, Any], key: str, what: str, load: Callable[[], Any]) -> Any | None:
    """``load()`` on the first call, kept in ``state[key]``; after a failure (reported once, kept in
    ``state["error"]``) None, without trying again."""
    if key in state:
        return state[key]
    if "error" in state:
        return None
    with _lock:
        if key not in state and "error" not in state:
            try:
                state[key] = load()
            except Exception as e:  # noqa: BLE001 -- no compiler / ninja / triton, a build error: torch path
                state["error"] = e
                _report_unavailable(what, e)
    return state.get(key)


def cpu_ops() -> Any | None:
    """`torch.ops.workbench_lowbit`, compiling it on the first call; None if it cannot be built."""
    return _load_once(_cpu, "ops", "CPU", _build_cpu)


def _import_triton() -> ModuleType:
    spec = importlib.util.spec_from_file_location("workbench_triton_lowbit", TRITON_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports triton
    return module


def triton_module() -> ModuleType | None:
    """`kernels/triton/lowbit.py`, imported on the first call (never on CPU-only paths); None if unusable."""
    return _load_once(_triton, "module", "Triton", _import_triton)


def _status(state: dict[str, Any], key: str) -> str:
    if key in state:
        return "ready"
    if "error" in state:
        err = state["error"]
        return f"error: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return "not loaded"


def available(build: bool = True) -> dict[str, Any]:
    """Kernel status: ``{"enabled", "max_rows", "cpu": {"status", "isa"}, "triton": {"status"}}``.

    With `build`, compiles (or loads) the CPU kernels first; the Triton kernels are imported only where
    CUDA is available.
    """
    if build and enabled():
        cpu_ops()
        if torch.cuda.is_available():
            triton_module()
    cpu: dict[str, Any] = {"status": _status(_cpu, "ops")}
    if "ops" in _cpu:
        cpu["isa"] = _cpu["ops"].lowbit_isa()
    triton = {"status": _status(_triton, "module") if torch.cuda.is_available() else "no CUDA device"}
    return {"enabled": enabled(), "max_rows": MAX_ROWS, "cpu": cpu, "triton": triton}


def _float32(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return _EMPTY
    return t if t.dtype == torch.float32 else t.float()


_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_matmul(layer, x: torch.Tensor) -> torch.Tensor | None:
    """x @ dequantized(layer).T by a fused kernel, or None when none applies (see the module doc).

    Inference only: the kernels have no backward, and `QuantLinear` calls this with grad disabled.
    """
    if layer.bits != 2 or not enabled():
        return None
    # straight from the module's dicts: nn.Module.__getattr__ costs about a microsecond per tensor
    qweight = layer._buffers["qweight"]
    scale, zero = layer._parameters["scale"], layer._parameters.get("zero")
    shape, k = x.shape, layer.in_features
    rows = x.numel() // k if k else 0
    if shape[-1] != k or rows == 0 or rows > MAX_ROWS:
        return None
    device = x.device
    if device.type == "cpu" and qweight.device.type == "cpu" and x.dtype in _CPU_DTYPES:
        gemm = _cpu.get("gemm")
        if gemm is None:
            ops = cpu_ops()
            if ops is None:
                return None
            gemm = _cpu["gemm"] = ops.lowbit_gemm.default
        y = gemm(x.reshape(rows, k), qweight, _float32(scale), _float32(zero), layer.group_size, k)
    elif device.type == "cuda" and qweight.device == device and x.dtype in _CUDA_DTYPES:
        module = triton_module()
        if module is None:
            return None
        y = module.lowbit_gemm(x.reshape(rows, k), qweight, _float32(scale), None if zero is None else _float32(zero),
                               layer.group_size, k)
    else:
        return None
    return y.view(*shape[:-1], layer.out_features)


def reference_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """The pure-torch path: dequantize to x's dtype and multiply (what `QuantLinear` falls back to)."""
    return torch.nn.functional.linear(x, layer.dequantized_weight(x.dtype))


def fused_lora_add(layer, x: torch.Tensor, y: torch.Tensor) -> bool:
    """y += scaling * x @ A.T @ B.T in place by the CPU kernel (float32, decode sizes); False when it
    does not apply and the caller must add the adapters itself."""
    if not enabled() or x.dtype != torch.float32 or y.dtype != torch.float32 or x.device.type != "cpu":
        return False
    rows = x.numel() // layer.in_features
    if rows > MAX_ROWS or not y.is_contiguous():
        return False
    add = _cpu.get("lora_add")
    if add is None:
        ops = cpu_ops()
        if ops is None:
            return False
        add = _cpu["lora_add"] = ops.lowbit_lora_add.default
    a, b = layer._parameters["lora_A"], layer._parameters["lora_B"]
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    add(y.view(rows, layer.out_features), x.reshape(rows, layer.in_features), a, b, layer.scaling)
    return True


# -- which layers have a kernel path (a pure description of `fused_matmul`'s dispatch) ----------------

CPU_KERNEL = "cpu:lowbit_gemm"  # kernels/cpu/lowbit.cpp
TRITON_KERNEL = "triton:lowbit_gemm"  # kernels/triton/lowbit.py
_DEVICE_KERNELS = {"cpu": CPU_KERNEL, "cuda": TRITON_KERNEL}


def kernel_path(kind: str, bits: int, group_size: int, device: str = "cpu") -> str | None:
    """The fused kernel `fused_matmul` dispatches a (kind, bits, group_size) layer to on `device`, or
    None when that layer runs unfused (dequantize + matmul) even at decode sizes.

    Pure: it assumes the kernels are enabled and built, and a decode-sized input (at most `MAX_ROWS`
    rows) of a dtype the kernel takes; inputs beyond that fall back for every format. The kernels
    cover the 2-bit block-64 layout only (2-bit asymmetric and ternary), at any group size that
    divides the row; 1-, 3- and 4-bit codes (a plain bit stream) have no kernel.
    """
    if bits != 2:  # both kinds of 2-bit code, at any group size (lowbit_gemm has a generic path)
        return None
    return _DEVICE_KERNELS.get(torch.device(device).type)


def layer_format(kind: str, bits: int, group_size: int) -> str:
    """A layer's format as people write it: ``ternary g64``, ``4-bit g256``."""
    return f"{'ternary' if kind == 'ternary' else f'{bits}-bit'} g{group_size}"


def _layer_fields(layer: Any) -> tuple[str, int, int]:
    if isinstance(layer, dict):
        return layer["kind"], int(layer["bits"]), int(layer["group_size"])
    return layer.kind, int(layer.bits), int(layer.group_size)


def _quant_layers(layers: Any) -> dict[str, Any]:
    """Name -> layer: a model's `QuantLinear`s, or a mapping of layers or quant_config.json entries."""
    if isinstance(layers, torch.nn.Module):
        from workbench.quant.linear import QuantLinear

        return {n: m for n, m in layers.named_modules() if isinstance(m, QuantLinear)}
    return dict(layers)


def unfused_layers(layers: Any, device: str = "cpu") -> dict[str, str]:
    """Layer name -> format (`layer_format`) of the quantized layers with no kernel path on `device`.

    `layers`: a model (its `QuantLinear`s), a mapping name -> `QuantLinear`, or the ``layers`` of a
    compressed directory's quant_config.json (entries with kind, bits, group_size)."""
    out = {}
    for name, layer in _quant_layers(layers).items():
        kind, bits, group = _layer_fields(layer)
        if kernel_path(kind, bits, group, device) is None:
            out[name] = layer_format(kind, bits, group)
    return out


def kernel_paths(layers: Any, device: str = "cpu") -> dict[str, str | None]:
    """Format -> kernel (None: unfused) for each format among `layers` (as `unfused_layers` takes)."""
    out: dict[str, str | None] = {}
    for layer in _quant_layers(layers).values():
        kind, bits, group = _layer_fields(layer)
        out.setdefault(layer_format(kind, bits, group), kernel_path(kind, bits, group, device))
    return out
