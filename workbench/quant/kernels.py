"""Dispatch to fused low-bit matmul kernels (`kernels/`), with the pure-torch path as the fallback.

`fused_matmul(layer, x)` returns x @ W.T for a `QuantLinear`'s quantized base weight (no bias, no
LoRA), or None when no kernel applies, in which case `QuantLinear` dequantizes and multiplies.

Kernels exist for 2-bit codes in the block-64 layout (2-bit asymmetric and ternary). On the CPU
(``WORKBENCH_KERNELS``, default ``1``):

* up to `crossover()` rows (decode): the integer kernel `lowbit_gemm_q8`, activations quantized to
  int8 per block of 64 (the error bound: `INT8_ERROR_BOUND`; relative output error about 0.6% for
  Gaussian activations);
* from there up to `wide_rows()` rows (batches): the same product by the wide integer kernel
  `lowbit_gemm_q8w` (AVX-512 VNNI, group sizes that are multiples of 64; elsewhere it runs
  `lowbit_gemm_q8`): lanes hold 16 weight rows, so the float work per block is a quarter of the
  tiles'; the same bound. Measured on 2 loaded Zen 4 cores, 4096x4096, one thread: 1.7-2.1x torch's
  bfloat16 dense matmul at 16-64 rows, where dequantize + bf16 matmul was 0.7-0.8x (it writes and
  re-reads W);
* from there up to `MAX_ROWS` rows (CPUs where the wide kernel loses): W dequantized to bfloat16 by
  `lowbit_dequant`, then torch's bfloat16 matmul (the result cast back to x's dtype);
* above `MAX_ROWS` rows (prefill): W dequantized in x's dtype by `lowbit_dequant` (the values of the
  pure-torch path bit for bit, faster), then torch's matmul: the pure-torch result exactly.

``WORKBENCH_KERNELS=exact`` keeps float arithmetic: the float kernel `lowbit_gemm` up to `MAX_ROWS`
rows (products in fp32), the exact dequantize + matmul above. ``WORKBENCH_KERNELS=0`` turns the
kernels off. ``WORKBENCH_KERNELS_ISA`` (avx512vnni, avxvnni, avx2, neon, scalar; avx512bf16, avx512
for the float kernels) lowers the instruction set the kernels use, chosen once at build time as the
best the CPU has. Both crossovers are measured once per machine and kernel build (`measure_crossover`,
about a second) and cached as ``crossover.json`` beside the build; ``WORKBENCH_KERNELS_CROSSOVER`` and
``WORKBENCH_KERNELS_WIDE`` override them, and `DEFAULT_CROSSOVER` (no wide rows) stands when they
cannot be measured.

* CPU: `kernels/cpu/lowbit.cpp` (and its headers), a torch op compiled on first use with
  `torch.utils.cpp_extension` and cached under ``$WORKBENCH_HOME/kernels`` (15-60 s on 2 cores, once
  per source version).
* CUDA: `kernels/triton/lowbit.py`, imported only when an input is on a CUDA device (up to
  `MAX_ROWS` rows).

The sources live in the checkout's top-level ``kernels/``; a wheel carries them as
``workbench/_kernels/`` (`kernel_dir`). A kernel that cannot be built, imported or launched is reported
once (a `RuntimeWarning`) and the pure-torch path is used from then on.

`kernel_path(kind, bits, group_size)` says which kernel a layer format dispatches to (None: unfused),
and `unfused_layers(model)` lists the layers that run unfused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# Rows (after flattening leading dims) up to which the float kernel (exact mode), the LoRA loops and
# the Triton kernel are used. Measured on 2 cores: the float CPU kernel beats dequantize + matmul at 64
# rows for every benchmark shape (1.1x at 576x576 bf16, 5x at 4096x4096); at 128 it loses on SmolLM2.
MAX_ROWS = 64
# Rows up to which the integer kernel runs when the crossover is not measured (then no wide rows:
# dequantize + bf16 matmul above). Measured on a Zen 4 core at 2048x2048, weights from memory: the
# integer kernel wins up to 4 rows, the wide one from 8 to 64 (2-4x dequantize + bf16 matmul there).
DEFAULT_CROSSOVER = 16
CROSSOVER_FILE = "crossover.json"
CROSSOVER_LADDER = (1, 2, 4, 8, 16, 32, 64)
# |y - y_float|[b, n] <= INT8_ERROR_BOUND * sum over blocks j of 64 of max|x[b, j]| * sum_{k in j} |W[n, k]|:
# rounding x / dx to an integer moves each activation by at most dx / 2 = max|x_j| / 254.
INT8_ERROR_BOUND = 1 / 254
INT_ISAS = ("avx512vnni", "avxvnni", "avx2", "neon", "scalar")
FLOAT_ISAS = ("avx512bf16", "avx512", "avx2", "scalar")


def kernel_dir() -> Path:
    """The kernel sources: ``workbench/_kernels`` in an installed wheel (setup.py packages the
    checkout's top-level ``kernels/`` there), else ``kernels/`` beside the package (a checkout)."""
    here = Path(__file__).resolve().parents[1]
    packaged = here / "_kernels"
    return packaged if (packaged / "cpu" / "lowbit.cpp").is_file() else here.parent / "kernels"


KERNEL_DIR = kernel_dir()
CPU_SOURCE = KERNEL_DIR / "cpu" / "lowbit.cpp"
CPU_HEADERS = (KERNEL_DIR / "cpu" / "lowbit_q8.h", KERNEL_DIR / "cpu" / "lowbit_q8_256.inc")
TRITON_SOURCE = KERNEL_DIR / "triton" / "lowbit.py"
# ISA-specific code carries its own `#pragma GCC target`, so no -march: the cache may be shared
CPU_CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_cpu: dict[str, Any] = {}  # "ops" once loaded, or "error"
_triton: dict[str, Any] = {}  # "module" once imported, or "error"
_EMPTY = torch.empty(0)


def mode() -> str:
    """``off`` (``WORKBENCH_KERNELS`` 0/false/off/no), ``exact`` (float kernels) or ``int8`` (the default)."""
    value = os.environ.get("WORKBENCH_KERNELS", "1").strip().lower()
    return "off" if value in ("0", "false", "off", "no") else "exact" if value == "exact" else "int8"


def enabled() -> bool:
    """False when ``WORKBENCH_KERNELS`` is 0/false/off/no."""
    return mode() != "off"


def kernel_cache_dir() -> Path:
    from workbench.home import workbench_home

    return workbench_home() / "kernels"


def _cpu_build_name() -> str:
    """Build name keyed by the source, flags, torch and Python, so a change never loads a stale build."""
    key = b"".join(p.read_bytes() for p in (CPU_SOURCE, *CPU_HEADERS))
    key += repr((CPU_CFLAGS, torch.__version__, sys.version_info[:2])).encode()
    return "workbench_lowbit_" + hashlib.sha1(key).hexdigest()[:12]


def _build_cpu() -> Any:
    from torch.utils import cpp_extension

    name = _cpu_build_name()
    build_dir = kernel_cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():
        print(f"workbench: compiling the low-bit CPU kernels into {build_dir} (once; up to a minute)",
              file=sys.stderr, flush=True)
    source = _stage_sources(build_dir / "src")
    cpp_extension.load(name=name, sources=[str(source)], extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS,
                       build_directory=str(build_dir), is_python_module=False, verbose=False)
    ops = torch.ops.workbench_lowbit
    apply_isa_env(ops)
    return ops


def _stage_sources(src_dir: Path) -> Path:
    """Copies the CPU sources into the build's own ``src_dir`` (a file only when it differs) and returns
    the main source there: ninja's build line then names the same path wherever workbench is installed
    (a checkout, a wheel, a temporary site), so one build serves them all (the name is the source hash)."""
    src_dir.mkdir(parents=True, exist_ok=True)
    for path in (CPU_SOURCE, *CPU_HEADERS):
        data, dest = path.read_bytes(), src_dir / path.name
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
    return src_dir / CPU_SOURCE.name


def apply_isa_env(ops: Any) -> None:
    """Applies ``WORKBENCH_KERNELS_ISA`` (done once, when the kernels are loaded); a bad value warns."""
    try:
        set_isa(os.environ.get("WORKBENCH_KERNELS_ISA", "auto"), ops)
    except ValueError as e:
        warnings.warn(f"workbench: {e}; using the best instruction set this CPU has", RuntimeWarning, stacklevel=2)


def set_isa(name: str, ops: Any = None) -> dict[str, str]:
    """Lowers the kernels' instruction set (``auto``: the best this CPU has; a name from `INT_ISAS` or
    `FLOAT_ISAS`; one the CPU lacks is lowered to the best below it). Returns the ISAs in use."""
    ops = ops if ops is not None else cpu_ops()
    name = name.strip().lower() or "auto"
    if name not in ("auto", *INT_ISAS, *FLOAT_ISAS):
        raise ValueError(f"WORKBENCH_KERNELS_ISA={name!r}: expected auto or one of {', '.join(INT_ISAS + FLOAT_ISAS)}")
    if name == "auto" or name in INT_ISAS:
        ops.lowbit_set_int_isa(name)
    if name == "auto" or name in FLOAT_ISAS:
        ops.lowbit_set_isa(name)
    return {"int": ops.lowbit_int_isa(), "float": ops.lowbit_isa()}


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
    """Kernel status: ``{"enabled", "mode", "max_rows", "crossover", "wide", "cpu": {"status", "isa", "int_isa"},
    "triton": {"status"}}``.

    With `build`, compiles (or loads) the CPU kernels first (and measures the crossover if it is not
    cached); the Triton kernels are imported only where CUDA is available.
    """
    if build and enabled():
        cpu_ops()
        if torch.cuda.is_available():
            triton_module()
    cpu: dict[str, Any] = {"status": _status(_cpu, "ops")}
    if "ops" in _cpu:
        cpu["isa"] = _cpu["ops"].lowbit_isa()
        cpu["int_isa"] = _cpu["ops"].lowbit_int_isa()
    triton = {"status": _status(_triton, "module") if torch.cuda.is_available() else "no CUDA device"}
    measured = build and "ops" in _cpu
    cross = crossover() if measured else _cpu.get("crossover", {}).get("crossover")
    wide = wide_rows() if measured else _cpu.get("crossover", {}).get("wide")
    return {"enabled": enabled(), "mode": mode(), "max_rows": MAX_ROWS, "crossover": cross, "wide": wide, "cpu": cpu,
            "triton": triton}


def _float32(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return _EMPTY
    return t if t.dtype == torch.float32 else t.float()


_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_scratch = threading.local()  # per thread and dtype, a dequantization buffer reused between calls
SCRATCH_MAX_BYTES = 64 << 20  # larger weights get a fresh buffer each call


def _weight_buffer(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [n, k] tensor; up to SCRATCH_MAX_BYTES a view of this thread's reused buffer
    (a fresh 32 MB tensor costs milliseconds of page faults per call)."""
    numel = n * k
    if numel * torch.finfo(dtype).bits // 8 > SCRATCH_MAX_BYTES:
        return torch.empty(n, k, dtype=dtype)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(n, k)


def dequantized(layer, dtype: torch.dtype, ops: Any = None) -> torch.Tensor:
    """The layer's weight in `dtype` (float32 or bfloat16) by the CPU kernel: the values of
    `QuantLinear.dequantized_weight(dtype)` bit for bit. Valid until this thread's next call."""
    ops = ops if ops is not None else cpu_ops()
    scale, zero = layer._parameters["scale"], layer._parameters.get("zero")
    k = layer.in_features
    return ops.lowbit_dequant(_weight_buffer(layer.out_features, k, dtype), layer._buffers["qweight"],
                              _float32(scale), _float32(zero), layer.group_size, k)


# -- the crossover between the integer kernel and dequantize + bf16 matmul --------------------------

def l3_bytes() -> int:
    """The last-level cache size from sysfs (0 when unknown)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                text = (index / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
                return int(text.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
    return 0


def _crossover_path() -> Path:
    return kernel_cache_dir() / _cpu_build_name() / CROSSOVER_FILE


def measure_crossover(ops: Any = None, n: int = 2048, k: int = 2048, repeats: int = 15) -> dict[str, Any]:
    """Times the integer kernel, the wide integer kernel and dequantize + bfloat16 matmul at 1-64 rows
    of an n x k 2-bit layer (group 64, bfloat16 activations), interleaved, the least of `repeats` runs
    each (the least, as other work on the CPUs only ever adds time). The crossover is the last row count
    of `CROSSOVER_LADDER` up to which the integer kernel beats both at every count; ``wide`` the last one
    above it up to which the wide kernel beats dequantize + matmul at every count (the crossover when it
    never does). About a second on one Zen 4 core."""
    ops = ops if ops is not None else cpu_ops()
    gen = torch.Generator().manual_seed(0)
    # copies of the layer, called in turn, that together exceed twice the last-level cache: every call
    # reads its weights from memory, as a model's layers do (from L3, the wide kernel looked faster
    # than the int8 tiles at 2-4 rows; from memory it is slower there)
    copies = max(1, min(64, -(-2 * l3_bytes() // (n * k // 4))))
    qweight = torch.randint(0, 256, (copies, n, k // 4), dtype=torch.uint8, generator=gen)
    scale = torch.rand(copies, n, k // 64, generator=gen) * 0.01 + 0.005
    zero = torch.rand(copies, n, k // 64, generator=gen) + 1.0
    w = torch.empty(n, k, dtype=torch.bfloat16)
    times: dict[int, list[float]] = {}
    # one thread: both paths scale alike over threads, and a call split over threads waits for the
    # slowest, so on CPUs shared with other work two threads measure the scheduler (8 ms stalls)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time_paths(ops, qweight, scale, zero, w, k, repeats, gen, times)
    finally:
        torch.set_num_threads(threads)
    cross = 0
    for rows in CROSSOVER_LADDER:
        if times[rows][0] > min(times[rows][1], times[rows][2]):
            break
        cross = rows
    cross = max(1, cross)
    wide = cross
    for rows in CROSSOVER_LADDER:
        if rows <= cross:
            continue
        if times[rows][2] > times[rows][1]:
            break
        wide = rows
    return {"crossover": cross, "wide": wide, "isa": ops.lowbit_int_isa(), "threads": 1, "shape": f"{n}x{k}",
            "copies": copies,
            "int8_ms": {r: round(t[0] * 1e3, 4) for r, t in times.items()},
            "int8_wide_ms": {r: round(t[2] * 1e3, 4) for r, t in times.items()},
            "dequant_bf16_matmul_ms": {r: round(t[1] * 1e3, 4) for r, t in times.items()}}


def _time_paths(ops: Any, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w: torch.Tensor, k: int,
                repeats: int, gen: torch.Generator, times: dict[int, list[float]]) -> None:
    """times[rows] = [int8 kernel, dequantize + bf16 matmul, wide int8 kernel] least seconds, interleaved."""
    with torch.inference_mode():
        for rows in CROSSOVER_LADDER:
            x = torch.randn(rows, k, generator=gen).bfloat16()
            calls = (lambda c: ops.lowbit_gemm_q8(x, qweight[c], scale[c], zero[c], 64, k),
                     lambda c: x @ ops.lowbit_dequant(w, qweight[c], scale[c], zero[c], 64, k).T,
                     lambda c: ops.lowbit_gemm_q8w(x, qweight[c], scale[c], zero[c], 64, k))
            for call in calls:
                call(0)  # warm: first-touch pages, oneDNN's kernel selection
            best = [float("inf")] * len(calls)
            for r in range(repeats):
                for i, call in enumerate(calls):
                    c = (r * len(calls) + i) % qweight.shape[0]
                    t0 = time.perf_counter()
                    call(c)
                    best[i] = min(best[i], time.perf_counter() - t0)
            times[rows] = best


def crossover(remeasure: bool = False) -> int:
    """Rows up to which the integer kernel runs (int8 mode): ``WORKBENCH_KERNELS_CROSSOVER``, else the
    cached measurement for this build and ISA, else measured now and cached; `DEFAULT_CROSSOVER` when
    the kernels are unavailable or the measurement fails."""
    env = os.environ.get("WORKBENCH_KERNELS_CROSSOVER", "").strip()
    if env:
        return int(env)
    return _measured(remeasure)["crossover"]


def wide_rows(remeasure: bool = False) -> int:
    """Rows up to which the wide integer kernel runs above `crossover()` (int8 mode; from there to
    `MAX_ROWS`, dequantize + bf16 matmul): ``WORKBENCH_KERNELS_WIDE``, else measured with the crossover
    (cached); the crossover itself (no wide rows) when it cannot be measured."""
    env = os.environ.get("WORKBENCH_KERNELS_WIDE", "").strip()
    if env:
        return int(env)
    return _measured(remeasure)["wide"]


def _measured(remeasure: bool = False) -> dict[str, int]:
    """{"crossover", "wide"} for this build and ISA: cached in memory, then in `CROSSOVER_FILE`, else
    measured now and written there."""
    if not remeasure and "crossover" in _cpu:
        return _cpu["crossover"]
    ops = cpu_ops()
    if ops is None:
        return {"crossover": DEFAULT_CROSSOVER, "wide": DEFAULT_CROSSOVER}
    path = _crossover_path()
    value = None
    if not remeasure:
        try:
            data = json.loads(path.read_text())
            if data.get("isa") == ops.lowbit_int_isa():
                value = {"crossover": int(data["crossover"]), "wide": int(data["wide"])}
        except (OSError, ValueError, KeyError, TypeError):
            value = None
    if value is None:
        try:
            data = measure_crossover(ops)
            value = {"crossover": data["crossover"], "wide": data["wide"]}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 -- a read-only cache, a failed run: the default, said once
            warnings.warn(f"workbench: could not measure the low-bit kernel crossover ({type(e).__name__}: {e}); "
                          f"using {DEFAULT_CROSSOVER} rows", RuntimeWarning, stacklevel=3)
            value = {"crossover": DEFAULT_CROSSOVER, "wide": DEFAULT_CROSSOVER}
    _cpu["crossover"] = value
    return value


def cpu_path(rows: int) -> str:
    """The CPU path `fused_matmul` takes for `rows` rows in the current mode: ``int8``, ``int8-wide``,
    ``dequant+bf16``, ``float`` (exact mode) or ``dequant`` (above `MAX_ROWS`)."""
    if rows > MAX_ROWS:
        return "dequant"
    if mode() == "exact":
        return "float"
    if rows == 1 or rows <= crossover():
        return "int8"
    return "int8-wide" if rows <= wide_rows() else "dequant+bf16"


_PATH_OPS = {"float": "gemm", "int8": "gemm_q8", "int8-wide": "gemm_q8w"}


def _cpu_matmul(layer, x2: torch.Tensor, rows: int, ops: Any) -> torch.Tensor:
    qweight = layer._buffers["qweight"]
    scale, zero = layer._parameters["scale"], layer._parameters.get("zero")
    k = layer.in_features
    path = cpu_path(rows)
    key = _PATH_OPS.get(path)
    if key is not None:
        gemm = _cpu.get(key)
        if gemm is None:
            gemm = _cpu[key] = getattr(ops, f"lowbit_{key}").default
        return gemm(x2, qweight, _float32(scale), _float32(zero), layer.group_size, k)
    if path == "dequant+bf16":
        y = torch.nn.functional.linear(x2.to(torch.bfloat16), dequantized(layer, torch.bfloat16, ops))
        return y if x2.dtype == torch.bfloat16 else y.to(x2.dtype)
    return torch.nn.functional.linear(x2, dequantized(layer, x2.dtype, ops))  # prefill: exact


def fused_matmul(layer, x: torch.Tensor) -> torch.Tensor | None:
    """x @ dequantized(layer).T by a fused kernel, or None when none applies (see the module doc).

    Inference only: the kernels have no backward, and `QuantLinear` calls this with grad disabled.
    """
    if layer.bits != 2 or not enabled():
        return None
    # straight from the module's dicts: nn.Module.__getattr__ costs about a microsecond per tensor
    qweight = layer._buffers["qweight"]
    shape, k = x.shape, layer.in_features
    rows = x.numel() // k if k else 0
    if shape[-1] != k or rows == 0:
        return None
    device = x.device
    if device.type == "cpu" and qweight.device.type == "cpu" and x.dtype in _CPU_DTYPES:
        ops = _cpu.get("ops") or cpu_ops()
        if ops is None:
            return None
        y = _cpu_matmul(layer, x.reshape(rows, k), rows, ops)
    elif device.type == "cuda" and qweight.device == device and x.dtype in _CUDA_DTYPES and rows <= MAX_ROWS:
        y = triton_matmul(layer, x.reshape(rows, k))
        if y is None:
            return None
    else:
        return None
    return y.view(*shape[:-1], layer.out_features)


def triton_matmul(layer, x2: torch.Tensor) -> torch.Tensor | None:
    """x2 [rows, K] @ W.T by the Triton kernel, or None when it is unusable: a failed import or launch
    (a compile error, an unsupported GPU) is reported once and turns the Triton kernels off, so the
    pure-torch path runs from then on. (A fault that poisons the CUDA context cannot be recovered.)"""
    module = triton_module()
    if module is None:
        return None
    scale, zero = layer._parameters["scale"], layer._parameters.get("zero")
    try:
        return module.lowbit_gemm(x2, layer._buffers["qweight"], _float32(scale),
                                  None if zero is None else _float32(zero), layer.group_size, layer.in_features)
    except Exception as e:  # noqa: BLE001 -- any launch failure: the torch path, said once
        with _lock:
            if "module" in _triton:
                _triton.pop("module")
                _triton["error"] = e
                _report_unavailable("Triton", e)
        return None


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

    Pure: it assumes the kernels are enabled and built, and an input of a dtype the kernel takes (on
    CUDA at most `MAX_ROWS` rows; on the CPU larger inputs take the kernel's dequantization). The kernels
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
