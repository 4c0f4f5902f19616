"""`workbench bench-kernels`: the fused low-bit kernels against torch dense matmuls of the same shape.

For each shape N x K (out x in), format (2-bit asymmetric, ternary), activation rows and dtype, the
time per call of `kernels.fused_matmul` (the path the kernels' mode and crossover pick: the int8
kernel, or dequantize + bf16 matmul) is compared with torch's `x @ W.T` for a float32 and a bfloat16
W. Weights are random (seeded), quantized with `quantize_weight` (2-bit: rtn, ternary: absmean; the
method does not change the speed) and packed by `QuantLinear.from_quantized`.

Stable figures:

* interleaved: each of `rounds` rounds times the three contenders one after another (the order
  rotating), `per_round` calls each; a round's figure is its fastest call (other work on the CPUs only
  ever adds time: with 2 threads on 2 shared cores a call waits whole scheduler slices, ~8 ms, for a
  descheduled sibling, which a round's median still caught: spreads of 30-850% on the dense baseline),
  a figure is the median over rounds, and its spread is (max - min) / median over the rounds, so a
  burst of other work shows up as spread instead of moving one contender only;
* threads pinned: ``torch.set_num_threads(threads)``, which the kernels' OpenMP loops
  (`at::parallel_for`) share;
* caches flushed (unless ``--no-flush``): a buffer of max(128 MB, 4 x L3) is written between timed
  calls, so every call reads its weights from memory as a model's decode step does (a 64 MB float32
  matrix fits a 105 MB L3 and would otherwise flatter the dense baseline in a loop).

Also runnable as ``python -m workbench.quant.bench_kernels``.
"""

from __future__ import annotations

import argparse
import json
import os
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
FLUSH_MIN_BYTES = 128 << 20


@dataclass
class Measurement:
    format: str
    shape: str
    batch: int
    dtype: str
    seconds: float  # median over rounds
    speedup_vs_fp32: float
    speedup_vs_bf16: float
    device: str
    fp32_seconds: float
    bf16_seconds: float
    spread: float  # (max - min) / median of the rounds' figures (fastest call each), ours
    fp32_spread: float
    bf16_spread: float
    path: str  # what fused_matmul ran: kernels.cpu_path (int8, int8-wide, dequant+bf16, float, dequant)
    isa: str
    threads: int
    flushed: bool
    rounds: int
    mode: str
    load_1m: float  # the 1-minute load average when the figure was taken (other work on the CPUs)


def l3_bytes() -> int:
    """The last-level cache size (`kernels.l3_bytes`; imported here lazily: the CLI parser needs no torch)."""
    from workbench.quant.kernels import l3_bytes as measure

    return measure()


class Flusher:
    """Writes a buffer larger than the last-level cache, evicting whatever a timed call left there."""

    def __init__(self) -> None:
        import torch

        self.nbytes = max(FLUSH_MIN_BYTES, 4 * l3_bytes())
        self.buf = torch.zeros(self.nbytes, dtype=torch.uint8)

    def __call__(self) -> None:
        self.buf.add_(1)


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int = 7, per_round: int = 5,
                     flush: Callable[[], None] | None = None, min_time: float = 0.0) -> dict[str, tuple[float, float]]:
    """name -> (median over `rounds` interleaved rounds of each round's fastest call, spread) (see the
    module doc). Each round runs a call `per_round` times (or for at least `min_time` seconds),
    flushing before each timed call when `flush` is given."""
    names = list(calls)
    for fn in calls.values():  # warm: first-touch pages, oneDNN's kernel choice
        fn()
        fn()
    per: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < per_round or (time.perf_counter() - start < min_time and len(times) < 500):
                if flush:
                    flush()
                t0 = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - t0)
            per[name].append(min(times))
    out = {}
    for name, values in per.items():
        med = statistics.median(values)
        out[name] = (med, (max(values) - min(values)) / med if med > 0 else 0.0)
    return out


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def run_bench(shapes: list[str], batches: list[int], formats: list[str], dtypes: list[str], group_size: int = 64,
              flush: bool = True, rounds: int = 9, per_round: int = 5, min_time: float = 0.01, seed: int = 0,
              threads: int | None = None,
              on_result: Callable[[Measurement], None] | None = None) -> list[Measurement]:
    """Measure every combination; `on_result` sees each measurement as it is made."""
    import torch

    from workbench.quant import kernels
    from workbench.quant.linear import QuantLinear
    from workbench.quant.quantizers import quantize_weight

    if threads:
        torch.set_num_threads(threads)
    status = kernels.available()
    if status["cpu"]["status"] != "ready" or not status["enabled"]:
        raise RuntimeError(f"the CPU low-bit kernels are not usable: {status}")
    isa = status["cpu"]["int_isa"] if status["mode"] == "int8" else status["cpu"]["isa"]
    nthreads = torch.get_num_threads()
    flusher = Flusher() if flush else None
    results: list[Measurement] = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for shape in shapes:
            n, k = parse_shape(shape)
            w = torch.randn(n, k, generator=gen) * 0.02
            dense = {"float32": w, "bfloat16": w.bfloat16()}
            layers = {fmt: QuantLinear.from_quantized(quantize_weight(w, FORMATS[fmt][0], group_size, FORMATS[fmt][1]))
                      for fmt in formats}
            for batch in batches:
                xs = {name: torch.randn(batch, k, generator=gen).to(getattr(torch, name)) for name in DTYPES}
                for fmt in formats:
                    layer = layers[fmt]
                    for dname in dtypes:
                        x = xs[dname]
                        if kernels.fused_matmul(layer, x) is None:
                            raise RuntimeError(f"fused_matmul declined {fmt} {shape} batch {batch} {dname}")
                        calls = {"ours": lambda x=x, layer=layer: kernels.fused_matmul(layer, x),
                                 "fp32": lambda x=xs["float32"]: x @ dense["float32"].T,
                                 "bf16": lambda x=xs["bfloat16"]: x @ dense["bfloat16"].T}
                        t = time_interleaved(calls, rounds, per_round, flusher, 0.0 if flush else min_time)
                        m = Measurement(fmt, f"{n}x{k}", batch, dname, t["ours"][0],
                                        t["fp32"][0] / t["ours"][0], t["bf16"][0] / t["ours"][0], "cpu", t["fp32"][0],
                                        t["bf16"][0], t["ours"][1], t["fp32"][1], t["bf16"][1],
                                        kernels.cpu_path(batch), isa, nthreads, flush, rounds, status["mode"],
                                        round(os.getloadavg()[0], 2))
                        results.append(m)
                        if on_result:
                            on_result(m)
    return results


def describe(flush: bool, threads: int) -> str:
    """What was done to make the figures stable, in one line."""
    how = (f"caches flushed between timed calls ({max(FLUSH_MIN_BYTES, 4 * l3_bytes()) >> 20} MB written; "
           f"L3 {l3_bytes() >> 20} MB)" if flush else "caches not flushed (weights may stay in L3)")
    return (f"medians of interleaved rounds, spread = (max - min) / median; {threads} threads pinned "
            f"(torch.set_num_threads, shared by the kernels' OpenMP loops); {how}")


def print_table(results: list[Measurement]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not results:
        return
    r0 = results[0]
    table = Table(title=f"low-bit kernels vs torch dense ({r0.device}, {r0.mode}, {r0.isa}, {r0.threads} threads"
                        f"{', caches flushed' if r0.flushed else ''})")
    for col in ("format", "N x K", "batch", "dtype", "path", "ours ms", "spread", "fp32 ms", "bf16 ms", "x fp32",
                "x bf16"):
        table.add_column(col, justify="left" if col in ("format", "N x K", "dtype", "path") else "right", no_wrap=True)
    for m in results:
        table.add_row(m.format, m.shape, str(m.batch), m.dtype, m.path, f"{m.seconds * 1e3:.3f}", f"{m.spread:.0%}",
                      f"{m.fp32_seconds * 1e3:.3f}", f"{m.bf16_seconds * 1e3:.3f}", f"{m.speedup_vs_fp32:.2f}",
                      f"{m.speedup_vs_bf16:.2f}")
    Console(width=max(110, Console().width)).print(table)


def add_bench_kernels_parser(sub) -> argparse.ArgumentParser:
    """Add `bench-kernels` to an argparse subparsers object."""
    p = sub.add_parser("bench-kernels", help="time the fused low-bit kernels against torch dense matmuls")
    p.add_argument("--quick", action="store_true", help=f"a subset: {', '.join(QUICK_SHAPES)}; batches 1, 16")
    p.add_argument("--shapes", nargs="+", metavar="NxK", help="out x in shapes (default: llama and SmolLM2 layers)")
    p.add_argument("--batches", nargs="+", type=int, metavar="B", help="activation rows (default 1 4 16)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--mode", choices=["int8", "exact"], default=None,
                   help="the kernels' mode (default: WORKBENCH_KERNELS, int8 unless set to exact)")
    p.add_argument("--no-flush", action="store_true", help="do not flush caches between timed calls")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the kernels (default: torch's)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per figure (default 9)")
    p.add_argument("--per-round", type=int, default=5, help="timed calls per contender and round (default 5)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write one JSON line per measurement")
    p.set_defaults(func=run_bench_kernels_cli)
    return p


def run_bench_kernels_cli(args: argparse.Namespace) -> int:
    import torch

    if args.mode:
        os.environ["WORKBENCH_KERNELS"] = "exact" if args.mode == "exact" else "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    flush = not args.no_flush
    print(f"workbench bench-kernels: {describe(flush, torch.get_num_threads())}", file=sys.stderr, flush=True)
    out = args.json.open("w") if args.json else None
    try:
        def emit(m: Measurement) -> None:
            print(f"{m.format:8s} {m.shape:>11s} batch {m.batch:2d} {m.dtype:9s} {m.path:13s} {m.seconds * 1e3:9.3f} ms "
                  f"(spread {m.spread:.0%})  x{m.speedup_vs_fp32:.2f} vs fp32  x{m.speedup_vs_bf16:.2f} vs bf16 "
                  f"(spreads fp32 {m.fp32_spread:.0%}, bf16 {m.bf16_spread:.0%}; load {m.load_1m})",
                  file=sys.stderr, flush=True)
            if out:
                out.write(json.dumps(asdict(m)) + "\n")
                out.flush()

        results = run_bench(shapes, batches, args.formats, args.dtypes, args.group_size, flush, args.rounds,
                            args.per_round, on_result=emit)
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
