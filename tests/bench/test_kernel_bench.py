"""Low-bit kernels against torch dense matmuls, side by side in one run (`workbench bench-kernels`).

For every shape (N x K = out x in: 4096x4096, the llama MLP 11008x4096 / 4096x11008, and SmolLM2's
576x576, 192x576, 1536x576, 576x1536), format (2-bit asymmetric, ternary; group size 64), activation
rows (1, 4, 16) and dtype (float32, bfloat16), `kernels.fused_matmul` is timed against torch's
`x @ W.T` with W float32 and bfloat16 (median seconds per call, torch's default threads). One JSON
line per figure:

    {"bench": "kernels", "format": "2bit", "shape": "4096x4096", "batch": 1, "dtype": "float32",
     "seconds": ..., "speedup_vs_fp32": ..., "speedup_vs_bf16": ..., "device": "cpu", ...}
    {"bench": "kernels", "target": "4096x4096 batch 1 float32 vs torch fp32", "format": "2bit", ...}

Target (issue "Low-bit kernels"): at 4096x4096, batch 1, float32 activations, both formats run at
least 6x faster than the float32 dense GEMV. The CPUs may be shared with other work, which slows
a kernel that splits its rows over every core: each figure carries the 1-minute load average, and
the target case is measured up to BENCH_MAX_ATTEMPTS (3) times, keeping the best.

Knobs: BENCH_KERNELS_QUICK=1 (a subset of shapes and batches), BENCH_KERNELS_COLD=1 (rotate weight
copies so each call reads from memory), BENCH_NO_TARGETS=1 (print the figures; assert nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

TARGET_SPEEDUP = 6.0
TARGET_SHAPE = "4096x4096"
MAX_ATTEMPTS = int(os.environ.get("BENCH_MAX_ATTEMPTS", "3"))


def emit(**fields) -> None:
    print(json.dumps({"bench": "kernels", **fields}), flush=True)


def test_kernels_against_torch_dense():
    import torch

    from workbench.quant import bench_kernels as bk
    from workbench.quant import kernels

    status = kernels.available()
    if status["cpu"]["status"] != "ready":
        pytest.skip(f"the CPU kernels are unavailable here: {status['cpu']}")
    quick = os.environ.get("BENCH_KERNELS_QUICK") == "1"
    cold = os.environ.get("BENCH_KERNELS_COLD") == "1"
    shapes = bk.QUICK_SHAPES if quick else bk.DEFAULT_SHAPES
    batches = bk.QUICK_BATCHES if quick else bk.DEFAULT_BATCHES
    emit(isa=status["cpu"]["isa"], threads=torch.get_num_threads(), cold=cold, torch=torch.__version__)

    def show(m) -> None:
        emit(**asdict(m), load_avg_1m=round(os.getloadavg()[0], 2))

    results = bk.run_bench(shapes, batches, list(bk.FORMATS), list(bk.DTYPES), cold=cold, on_result=show)
    assert len(results) == len(shapes) * len(batches) * len(bk.FORMATS) * len(bk.DTYPES)

    failures = []
    for fmt in bk.FORMATS:
        best = max(m.speedup_vs_fp32 for m in results
                   if (m.format, m.shape, m.batch, m.dtype) == (fmt, TARGET_SHAPE, 1, "float32"))
        attempts = 1
        while best < TARGET_SPEEDUP and attempts < MAX_ATTEMPTS:  # contention: measure again
            again = bk.run_bench([TARGET_SHAPE], [1], [fmt], ["float32"], cold=cold, on_result=show, seed=attempts)
            best = max(best, again[0].speedup_vs_fp32)
            attempts += 1
        emit(target=f"{TARGET_SHAPE} batch 1 float32 vs torch fp32", format=fmt, speedup_vs_fp32=round(best, 2),
             required=TARGET_SPEEDUP, attempts=attempts, met=best >= TARGET_SPEEDUP)
        if best < TARGET_SPEEDUP:
            failures.append(f"{fmt}: {best:.2f}x < {TARGET_SPEEDUP}x")
    if os.environ.get("BENCH_NO_TARGETS") != "1":
        assert not failures, "; ".join(failures)
