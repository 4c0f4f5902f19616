"""Fault injection at write boundaries, for the crash-safety tests (tests/test_fault_injection.py).

`fault_point(name)` is called where a kill -9 could leave something half-written: around the
renames of `workbench.atomic`, after each tensor the streaming shard writer writes, each history
row and checkpoint of the searches, each recovery and training checkpoint, each export write.

- ``WORKBENCH_KILL_AT=K``: the K-th call in this process sends itself SIGKILL (a real kill -9:
  no ``finally``, no atexit, no flush of Python buffers).
- ``WORKBENCH_FAULT_COUNT=PATH``: every call appends its name (one per line) to PATH, so a test
  learns how many points an action passes and which.

Both are read at the first call (and again after :func:`reset`, which a forked test child calls);
unset, a call is one global lookup and a return.
"""

from __future__ import annotations

import os
import signal

_armed: bool | None = None  # None: the environment is not read yet
_kill_at = 0
_count_path: str | None = None
_calls = 0


def reset() -> None:
    """Forget the count and read the environment again at the next call."""
    global _armed, _calls
    _armed, _calls = None, 0


def _load() -> None:
    global _armed, _kill_at, _count_path
    try:
        _kill_at = int(os.environ.get("WORKBENCH_KILL_AT") or 0)
    except ValueError:
        _kill_at = 0
    _count_path = os.environ.get("WORKBENCH_FAULT_COUNT") or None
    _armed = _kill_at > 0 or _count_path is not None


def fault_point(name: str) -> None:
    """A write boundary named `name` (see the module docstring)."""
    global _calls
    if _armed is False:
        return
    if _armed is None:
        _load()
        if not _armed:
            return
    _calls += 1
    if _count_path is not None:
        with open(_count_path, "a") as f:
            f.write(name + "\n")
    if _calls == _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
