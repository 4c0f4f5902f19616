"""``python tests/gpu/peak.py ARGS``: ``workbench ARGS`` in this process, then the peak CUDA memory
it allocated (per device) written as JSON to ``$WORKBENCH_GPU_PEAK`` (nothing without CUDA)."""

from __future__ import annotations

import json
import os
import sys

from workbench.cli import main

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    import torch

    if torch.cuda.is_available() and os.environ.get("WORKBENCH_GPU_PEAK"):
        peaks = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
        with open(os.environ["WORKBENCH_GPU_PEAK"], "w") as f:
            json.dump({"peak_cuda_bytes": peaks}, f)
    sys.exit(rc)
