"""The wheel's packages: ``workbench*`` plus the checkout's top-level ``kernels/`` (the C++ and Triton
sources, compiled or imported on first use) as ``workbench._kernels``, so that an installed wheel
finds them (`workbench.quant.kernels.kernel_dir`). pyproject.toml's package search can only name a
package after its own directory; everything else, the package data included, is in pyproject.toml."""

from setuptools import find_packages, setup

KERNELS = ["workbench._kernels", "workbench._kernels.cpu", "workbench._kernels.triton"]  # kernels/, cpu/, triton/

setup(packages=[*find_packages(include=["workbench", "workbench.*"]), *KERNELS],
      package_dir={"workbench._kernels": "kernels"})
