"""The aarch64 NEON / dotprod integer kernels (kernels/cpu/lowbit_q8.h), cross-compiled and run under
qemu-user: kernels/cpu/test_driver.cpp checks the NEON path and the scalar one against its own
double-precision reference (shapes and group sizes the layout allows, 1-5 activation rows, float and
bfloat16 in and out), within the int8 activation bound of lowbit_q8.h.

Two builds: the compiler's default target (armv8-a: the kernel is compiled for armv8.2-a+dotprod by
a pragma and chosen after a runtime check of HWCAP_ASIMDDP; qemu's default CPU has it) and
-march=armv8.2-a+dotprod (the kernel compiled directly, as Apple clang does). `make bench` installs
the tools (g++-aarch64-linux-gnu, qemu-user); without them the test is skipped. One JSON line per
build: {"bench": "kernels_arm", "march": ..., "checks": ..., "failed": ..., "sdot_instructions": ...}.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DRIVER = Path(__file__).parents[2] / "kernels" / "cpu" / "test_driver.cpp"
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
OBJDUMP = "aarch64-linux-gnu-objdump"

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None or shutil.which(QEMU) is None,
    reason=f"needs {CXX} and {QEMU} (apt-get install g++-aarch64-linux-gnu qemu-user; `make bench` does)")


@pytest.mark.parametrize("march", [None, "armv8.2-a+dotprod"])
def test_neon_dotprod_kernels_under_qemu(tmp_path, march):
    exe = tmp_path / "driver"
    flags = [f"-march={march}"] if march else []
    subprocess.run([CXX, "-O2", "-std=c++17", "-static", *flags, str(DRIVER), "-o", str(exe)], check=True,
                   capture_output=True)
    sdot = None
    if shutil.which(OBJDUMP):
        asm = subprocess.run([OBJDUMP, "-d", str(exe)], check=True, capture_output=True, text=True).stdout
        sdot = len(re.findall(r"\tsdot\t", asm))
    out = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    summary = re.match(r"(\d+) of (\d+) checks failed", lines[-1] if lines else "")
    neon = [ln for ln in lines if ln.startswith("neon ")]
    print(json.dumps({"bench": "kernels_arm", "march": march or "default", "checks": int(summary[2]) if summary else 0,
                      "failed": int(summary[1]) if summary else None, "neon_checks": len(neon),
                      "sdot_instructions": sdot}), flush=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert neon and all(ln.endswith(" ok") for ln in neon), "the NEON path did not run"
    assert "not available" not in " ".join(ln for ln in lines if ln.startswith("neon"))
    if sdot is not None:
        assert sdot > 0, "no sdot instruction in the NEON build"


def test_the_torch_op_compiles_for_aarch64():
    """kernels/cpu/lowbit.cpp against torch's (architecture-independent) headers, syntax only: the x86
    sections compile out and the NEON path of lowbit_q8.h is in."""
    import torch

    inc = Path(torch.__file__).parent / "include"
    src = DRIVER.parent / "lowbit.cpp"
    out = subprocess.run([CXX, "-fsyntax-only", "-std=c++17", "-fopenmp", f"-I{inc}",
                          f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{DRIVER.parent}", str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
