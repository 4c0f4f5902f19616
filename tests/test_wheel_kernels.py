"""A built wheel carries the kernel sources: installed outside the checkout, workbench finds the C++
kernel (``workbench/_kernels``), builds or reuses it from the normal kernel cache (the build is named
by the source hash and compiled from a copy in the build's own folder, so the checkout's build serves
the wheel too) and runs a `QuantLinear` matmul through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "workbench", "kernels")

CHECK = r"""
import sys, warnings
from pathlib import Path
import torch
import workbench
from workbench.quant import kernels
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import quantize_weight

site = Path(sys.argv[1]).resolve()
assert Path(workbench.__file__).resolve().is_relative_to(site), workbench.__file__
assert kernels.KERNEL_DIR.is_relative_to(site / "workbench" / "_kernels"), kernels.KERNEL_DIR
assert (kernels.KERNEL_DIR / "triton" / "lowbit.py").is_file()
warnings.simplefilter("error")  # a kernel that cannot be built warns: fail instead
assert kernels.cpu_ops() is not None and kernels.available(build=False)["cpu"]["status"] == "ready"
g = torch.Generator().manual_seed(0)
for kind, bits, method in (("asym", 2, "rtn"), ("ternary", 1.58, "absmean")):
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(48, 256, generator=g), bits, 64, method))
    x = torch.randn(3, 256, generator=g)
    with torch.no_grad():
        y = kernels.fused_matmul(layer, x)
        ref = kernels.reference_matmul(layer, x)
    assert y is not None and y.shape == (3, 48)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), (y - ref).abs().max()
print("kernel", kernels.available(build=False)["cpu"]["isa"])
"""


@pytest.mark.timeout(240)
def test_an_installed_wheel_finds_and_uses_the_cpu_kernel(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name, **(
            {"ignore": ignore} if (REPO / name).is_dir() else {}))
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist)],
                   check=True, capture_output=True, cwd=tmp_path, timeout=120)
    (wheel,) = dist.glob("workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("cpu/lowbit.cpp", "cpu/lowbit_q8.h", "cpu/lowbit_q8_256.inc", "triton/lowbit.py"):
        assert f"workbench/_kernels/{f}" in names, f
        assert zipfile.ZipFile(wheel).read(f"workbench/_kernels/{f}") == (REPO / "kernels" / f).read_bytes()
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site), "WORKBENCH_KERNELS": "exact"}
    out = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("kernel ")
