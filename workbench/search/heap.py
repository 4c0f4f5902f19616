"""Keep freed memory in the process heap, so a search's forward passes do not page-fault.

glibc serves an allocation above its mmap threshold (at most 32 MiB by default) with a fresh
``mmap`` and unmaps it on free, and trims the heap's free top beyond a trim threshold. A scoring
pass allocates the same large buffers every candidate (the [positions, vocab] logits: 180 MB for
SmolLM2 on the zoo), so each candidate pays their page faults again: measured here, a 171 MB
buffer costs 44K faults and 59 ms per allocation, against none and 6 ms once the heap keeps it.
A search worker runs the same workload hundreds of times, so its peak stays its steady size.
The setting is process-wide: an in-process search (``--backend local``, the UI) leaves that
process holding its peak memory afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 31


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where libc is not glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (ValueError, OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
