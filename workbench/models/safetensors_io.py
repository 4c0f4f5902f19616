"""Read and write safetensors one tensor at a time, with memory bounded by the tensor in flight.

The `safetensors` library covers the common cases (and tests use it as the reference), but
two things a streaming merge needs it cannot do:

- reading: ``safe_open`` memory-maps the whole file, and every page it touches stays counted in
  the process's resident memory until the file is closed, so reading three 500 MB models "lazily"
  still grows RSS by 1.5 GB. Here each tensor gets a mapping of its own bytes only, unmapped when
  the tensor is freed: no copy out of the page cache (copying with ``pread`` made a task-arithmetic
  merge of three SmolLM2 copies take 1.3-1.8 s instead of 0.7 s), and memory bounded by the tensors
  alive.
- writing: ``save_file`` needs every tensor of a shard in memory at once. A merge knows every
  output tensor's name, dtype and shape before it starts, so the header is written first and
  tensor bytes are appended as they are produced.

Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from workbench.faults import fault_point

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
MAX_HEADER_BYTES = 100_000_000


# bits per element of every dtype the safetensors format defines (workbench reads NAME_DTYPES)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header does not describe its bytes; the message names the file,
    the tensor and the bytes expected vs present."""


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_header(path: Path) -> tuple[dict, int]:
    """Return ``(header, data_start)``, checked against the file's size (see :func:`check_header`);
    the header maps names to dtype/shape/data_offsets. Reads the header only."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsHeaderError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsHeaderError(f"{path}: header length {n} is implausible; not a safetensors file?")
        if 8 + n > size:
            raise SafetensorsHeaderError(f"{path}: the header says it is {n} bytes long, but the file has only "
                                         f"{size} bytes (cut short, or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsHeaderError(f"{path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    check_header(path, header, 8 + n, size)
    return header, 8 + n


def tensor_nbytes(path: Path, name: str, info: object) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, checked: known dtype, and as many bytes as its shape
    and dtype take."""
    if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"])):
        raise SafetensorsHeaderError(f"{path}: tensor {name!r}: malformed header entry {str(info)[:200]} "
                                     "(expected dtype, shape and data_offsets [begin, end])")
    if info.get("dtype") not in DTYPE_BITS:
        raise SafetensorsHeaderError(f"{path}: tensor {name!r} has unknown dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    numel = 1
    for d in info["shape"]:
        numel *= d
    bits = numel * DTYPE_BITS[info["dtype"]]
    if (end - begin) * 8 != bits:
        need = bits // 8 if bits % 8 == 0 else bits / 8
        raise SafetensorsHeaderError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), but its shape "
            f"{info['shape']} of {info['dtype']} takes {need} bytes")
    return begin, end


def check_header(path: Path, header: dict, data_start: int, size: int) -> None:
    """Every tensor's bytes must match its shape and dtype, lie within the file's ``size`` bytes,
    and not overlap another's. A cut-short file is named with the first tensor past the end."""
    ranges = sorted((*tensor_nbytes(path, name, info), name) for name, info in header.items())
    past = [(b, e, n) for b, e, n in ranges if data_start + e > size]
    if past:
        begin, end, name = past[0]
        more = f" (and {len(past) - 1} more tensors after it)" if len(past) > 1 else ""
        raise SafetensorsHeaderError(
            f"{path}: cut short (an incomplete download?): the file has {size} bytes, its header needs "
            f"{data_start + ranges[-1][1]}; tensor {name!r} needs bytes {data_start + begin}..{data_start + end}"
            f"{more}")
    reach = (0, 0, "")  # the range that ends furthest so far
    for begin, end, name in ranges:
        if begin < reach[1] and begin < end:  # an empty tensor overlaps nothing
            raise SafetensorsHeaderError(f"{path}: tensors {reach[2]!r} (data bytes {reach[0]}..{reach[1]}) "
                                         f"and {name!r} (data bytes {begin}..{end}) overlap")
        reach = max(reach, (begin, end, name), key=lambda r: r[1])


class SafetensorsFile:
    """One safetensors file, read tensor by tensor, each through a mapping of its own bytes.

    Opening it reads and checks the header against the file's size (see :func:`check_header`),
    so a cut-short file is refused before any tensor is read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self.data_start = read_header(self.path)
        for name, info in self.header.items():
            if info["dtype"] not in NAME_DTYPES:
                raise SafetensorsHeaderError(
                    f"{self.path}: tensor {name!r} has dtype {info['dtype']}, which workbench does not read "
                    f"(expected one of {', '.join(NAME_DTYPES)})")
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> torch.dtype:
        return NAME_DTYPES[self.header[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor, backed by a private (copy-on-write) mapping of the file: writing to it never
        changes the file, and the mapping goes when the last view of the tensor does. Files are
        replaced by rename, never rewritten in place, so a mapping stays valid (and the header was
        checked against the file's size when it was opened)."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = NAME_DTYPES[info["dtype"]]
        numel = (end - begin) // dtype_size(dtype)
        if not numel:
            return torch.empty(info["shape"], dtype=dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start = self.data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        view = mmap.mmap(self._fd, start + (end - begin) - aligned, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        if (start - aligned) % dtype_size(dtype):   # torch needs aligned elements: copy instead
            flat = torch.frombuffer(view, dtype=torch.uint8, offset=start - aligned, count=end - begin)
            return flat.clone().view(dtype).view(info["shape"])
        flat = torch.frombuffer(view, dtype=dtype, offset=start - aligned, count=numel)
        return flat.view(info["shape"])

    def close(self) -> None:
        """Close the file; tensors already returned keep their own mappings."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StreamingShardWriter:
    """Write one safetensors shard whose tensor list is known in advance.

    ``specs`` is the ordered list of ``(name, dtype, shape)``; call :meth:`write` once per
    tensor in that order, then :meth:`close`.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            n = dtype_size(dtype)
            for d in shape:
                n *= d
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, dtype, tuple(shape)))
            offset += n
        self.nbytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as safetensors does
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self._order[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(f"{self.path}: expected {want_name} {want_dtype} {list(want_shape)}, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1
        fault_point("shard:tensor")

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self._f.close()

    def abort(self) -> None:
        """Close after a failure; a second failure (a full disk refusing the buffered bytes) is not
        raised over the first."""
        try:
            self._f.close()
        except OSError:
            pass
