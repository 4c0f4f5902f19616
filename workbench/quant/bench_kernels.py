"""`workbench bench-kernels`: the fused low-bit kernels against torch dense matmuls of the same shape.

For each shape N x K (out x in), format (2-bit asymmetric, ternary), activation rows and dtype, the
time per call of `kernels.fused_matmul` is compared with torch's `x @ W.T` for a float32 and a
bfloat16 W. A figure is the least of 3 rounds' medians, so a round slowed by other work on the CPUs
does not count. Weights are random (seeded), quantized with `quantize_weight` (2-bit: rtn, ternary:
absmean; the method does not change the speed) and packed by `QuantLinear.from_quantized`.

``--cold`` cycles through enough copies of every weight to overflow the last-level cache, so each
call reads its weights from memory, as a whole model's decode step does; by default a layer's
packed weights (a few MB) stay in cache between calls while large dense weights do not.

Also runnable as ``python -m workbench.quant.bench_kernels``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "192x576", "1536x576", "576x1536"]
QUICK_SHAPES = ["4096x4096", "576x576", "1536x576"]
DEFAULT_BATCHES = [1, 4, 16]
QUICK_BATCHES = [1, 16]
FORMATS = {"2bit": (2, "rtn"), "ternary": (1.58, "absmean")}
DTYPES = ("float32", "bfloat16")  # activation dtypes
COLD_BYTES = 96 << 20  # more than the last-level cache of the machines we run on
MAX_COPIES = 256


@dataclass
class Measurement:
    format: str
    shape: str
    batch: int
    dtype: str
    seconds: float
    speedup_vs_fp32: float
    speedup_vs_bf16: float
    device: str
    fp32_seconds: float
    bf16_seconds: float
    isa: str
    threads: int
    cold: bool


def time_call(fn: Callable[[int], object], min_time: float = 0.03, rounds: int = 3, min_repeats: int = 5,
              max_repeats: int = 200) -> float:
    """Seconds per call of fn(i) (i counts calls): the median of each round of at least `min_time`
    seconds, and the least of the rounds' medians (a round slowed by other work on the CPUs loses)."""
    for i in range(3):
        fn(i)
    medians = []
    i = 0
    for _ in range(rounds):
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_repeats or (time.perf_counter() - start < min_time and len(times) < max_repeats):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
            i += 1
        medians.append(statistics.median(times))
    return min(medians)


def _copies(nbytes: int, cold: bool) -> int:
    return min(MAX_COPIES, max(1, math.ceil(COLD_BYTES / max(1, nbytes)))) if cold else 1


def _layer_bytes(layer) -> int:
    tensors = [layer.qweight, layer.scale] + ([] if layer.zero is None else [layer.zero])
    return sum(t.numel() * t.element_size() for t in tensors)


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def run_bench(shapes: list[str], batches: list[int], formats: list[str], dtypes: list[str], group_size: int = 64,
              cold: bool = False, min_time: float = 0.03, rounds: int = 3, seed: int = 0,
              on_result: Callable[[Measurement], None] | None = None) -> list[Measurement]:
    """Measure every combination; `on_result` sees each measurement as it is made."""
    import torch

    from workbench.quant import kernels
    from workbench.quant.linear import QuantLinear
    from workbench.quant.quantizers import quantize_weight

    status = kernels.available()
    if status["cpu"]["status"] != "ready" or not status["enabled"]:
        raise RuntimeError(f"the CPU low-bit kernels are not usable: {status}")
    if max(batches) > kernels.MAX_ROWS:
        raise ValueError(f"batches above kernels.MAX_ROWS={kernels.MAX_ROWS} take the dequantize + matmul path")
    isa, threads = status["cpu"]["isa"], torch.get_num_threads()
    results: list[Measurement] = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for shape in shapes:
            n, k = parse_shape(shape)
            w = torch.randn(n, k, generator=gen) * 0.02
            dense = {"float32": w, "bfloat16": w.bfloat16()}
            layers = {}
            for fmt in formats:
                bits, method = FORMATS[fmt]
                layer = QuantLinear.from_quantized(quantize_weight(w, bits, group_size, method))
                copies = _copies(_layer_bytes(layer), cold)
                layers[fmt] = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
            dense_copies = {name: [t] + [t.clone() for _ in range(_copies(t.numel() * t.element_size(), cold) - 1)]
                            for name, t in dense.items()}
            del w
            for batch in batches:
                xs = {name: torch.randn(batch, k, generator=gen).to(getattr(torch, name)) for name in DTYPES}
                base = {}
                for name, ws in dense_copies.items():
                    x = xs[name]
                    base[name] = time_call(lambda i, x=x, ws=ws: x @ ws[i % len(ws)].T, min_time, rounds)
                for fmt in formats:
                    ls = layers[fmt]
                    for dname in dtypes:
                        x = xs[dname]
                        if kernels.fused_matmul(ls[0], x) is None:
                            raise RuntimeError(f"fused_matmul declined {fmt} {shape} batch {batch} {dname}")
                        call = lambda i, x=x, ls=ls: kernels.fused_matmul(ls[i % len(ls)], x)
                        sec = time_call(call, min_time, rounds)
                        m = Measurement(fmt, f"{n}x{k}", batch, dname, sec, base["float32"] / sec,
                                        base["bfloat16"] / sec, "cpu", base["float32"], base["bfloat16"], isa,
                                        threads, cold)
                        results.append(m)
                        if on_result:
                            on_result(m)
    return results


def print_table(results: list[Measurement]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not results:
        return
    r0 = results[0]
    table = Table(title=f"low-bit kernels vs torch dense ({r0.device}, {r0.isa}, {r0.threads} threads"
                        f"{', cold cache' if r0.cold else ''})")
    for col in ("format", "N x K", "batch", "dtype", "ours ms", "fp32 ms", "bf16 ms", "x fp32", "x bf16"):
        table.add_column(col, justify="left" if col in ("format", "N x K", "dtype") else "right", no_wrap=True)
    for m in results:
        table.add_row(m.format, m.shape, str(m.batch), m.dtype, f"{m.seconds * 1e3:.3f}", f"{m.fp32_seconds * 1e3:.3f}",
                      f"{m.bf16_seconds * 1e3:.3f}", f"{m.speedup_vs_fp32:.2f}", f"{m.speedup_vs_bf16:.2f}")
    Console(width=max(100, Console().width)).print(table)


def add_bench_kernels_parser(sub) -> argparse.ArgumentParser:
    """Add `bench-kernels` to an argparse subparsers object."""
    p = sub.add_parser("bench-kernels", help="time the fused low-bit kernels against torch dense matmuls")
    p.add_argument("--quick", action="store_true", help=f"a subset: {', '.join(QUICK_SHAPES)}; batches 1, 16")
    p.add_argument("--shapes", nargs="+", metavar="NxK", help="out x in shapes (default: llama and SmolLM2 layers)")
    p.add_argument("--batches", nargs="+", type=int, metavar="B", help="activation rows (default 1 4 16)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--cold", action="store_true", help="rotate weight copies so every call reads from memory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=0.03, help="seconds per timing round (default 0.03)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per figure; the least median counts")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write one JSON line per measurement")
    p.set_defaults(func=run_bench_kernels_cli)
    return p


def run_bench_kernels_cli(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    out = args.json.open("w") if args.json else None
    try:
        def emit(m: Measurement) -> None:
            print(f"{m.format:8s} {m.shape:>11s} batch {m.batch:2d} {m.dtype:9s} {m.seconds * 1e3:9.3f} ms  "
                  f"x{m.speedup_vs_fp32:.2f} vs fp32  x{m.speedup_vs_bf16:.2f} vs bf16", file=sys.stderr, flush=True)
            if out:
                out.write(json.dumps(asdict(m)) + "\n")
                out.flush()

        results = run_bench(shapes, batches, args.formats, args.dtypes, args.group_size, args.cold, args.min_time,
                            args.rounds, on_result=emit)
    finally:
        if out:
            out.close()
    print_table(results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.quant.bench_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_kernels_parser(parser.add_subparsers(dest="command")).prog = parser.prog
    return run_bench_kernels_cli(parser.parse_args(["bench-kernels", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
