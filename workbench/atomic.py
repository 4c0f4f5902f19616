"""Write outputs to a temporary path and rename them into place only when complete."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.faults import fault_point

# errno values of a write that ran out of room: the disk, the quota, or the file-size limit
_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large (the file system's or the process's file-size limit)"}
# the same, as libraries that do not raise OSError word it (safetensors' Rust writer: "(os error 28)")
_FULL_TEXT = re.compile(r"\(os error (28|122|27)\)|No space left on device|Disk quota exceeded|File too large")
_TEXT_ERRNO = {"28": errno.ENOSPC, "122": errno.EDQUOT, "27": errno.EFBIG, "No space left on device": errno.ENOSPC,
               "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG}


class OutputExistsError(WorkbenchError, FileExistsError):
    """An output path that already holds something, and no permission to replace it."""


class DiskFullError(WorkbenchError, OSError):
    """An atomic write that ran out of room (ENOSPC, EDQUOT, EFBIG): nothing was left at the target."""


def _full_errno(exc: BaseException) -> int | None:
    """The errno of a write that ran out of room, when ``exc`` (or what it was raised from) is one."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return exc.errno
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc.errno
        if not isinstance(exc, OSError) and isinstance(exc, Exception):
            m = _FULL_TEXT.search(str(exc))
            if m:
                return _TEXT_ERRNO[m.group(1) or m.group(0)]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _disk_full(target: Path, code: int) -> DiskFullError:
    err = DiskFullError(f"{target}: {_FULL[code]} ({os.strerror(code)}) while writing; nothing was written there")
    err.errno = code
    return err


# Temporary names carry this host and process, so a later run can tell (and remove) the leftovers
# of a process that was killed: ".NAME.tmp-HOST-PID-RANDOM".
_HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xffffffff:08x}"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories beside ``target`` left by a process of this host
    that no longer runs (a kill -9 mid-write); return what was removed. Others' are left alone."""
    target = Path(target)
    start = f"{target.name.lstrip('.')}.tmp-"   # and a temporary's own temporaries, "..NAME.tmp-..."
    removed = []
    try:
        entries = [e.name for e in os.scandir(target.parent)
                   if e.name.startswith(".") and e.name.lstrip(".").startswith(start)]
    except OSError:
        return removed
    for name in entries:
        m = re.match(r"([0-9a-f]{8})-(\d+)-", name.lstrip(".")[len(start):])
        if not m or m.group(1) != _HOST or _alive(int(m.group(2))):
            continue
        path = target.parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_stale_temporaries_in(directory: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temporaries` for every name in ``directory`` (before a check that it is empty)."""
    removed = []
    try:
        names = {e.name.split(".tmp-", 1)[0][1:] for e in os.scandir(directory)
                 if e.name.startswith(".") and ".tmp-" in e.name}
    except OSError:
        return removed
    for name in sorted(names):
        if name:
            removed += remove_stale_temporaries(Path(directory) / name)
    return removed


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def occupied(target: str | os.PathLike) -> bool:
    """Whether writing ``target`` would replace something: a file, a link or a non-empty directory."""
    target = Path(target)
    if target.is_symlink() or target.is_file():
        return True
    return target.is_dir() and any(target.iterdir())


def check_output(target: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite",
                 file: bool = False) -> None:
    """Refuse an existing file or non-empty directory at ``target`` unless ``overwrite`` (and any
    directory where a ``file`` is to be written); call it before any long work, so nothing runs for
    an output that would be refused at the end."""
    target = Path(target)
    if file and target.is_dir():
        raise OutputExistsError(f"{target}: is a directory; expected the path of a file to write")
    if overwrite or not occupied(target):
        return
    what = "directory" if target.is_dir() else "file"
    raise OutputExistsError(f"{target}: the output {what} already exists and is not empty; "
                            f"pass {flag} to replace it")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success rename it to ``target``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed, so an
    interrupted job never leaves a directory that looks finished.
    """
    target = Path(target).absolute()
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the output gets the usual permissions
    try:
        yield tmp
        fault_point("atomic_dir:before-rename")
        if target.exists() and _exchange(tmp, target):
            pass   # tmp now holds the old output: the target was never absent
        elif target.exists():
            old = tmp.with_name(tmp.name + "-old")   # a temporary name too: a later run removes it
            os.replace(target, old)
            os.replace(tmp, target)
            tmp = old
        else:
            os.replace(tmp, target)
            tmp = None
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        code = _full_errno(e)
        if code is not None:
            raise _disk_full(target, code) from None
        raise
    fault_point("atomic_dir:after-rename")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed over it when the block succeeds (removed otherwise),
    for writers that open their output by path themselves (gguf's); `atomic_file` builds on it."""
    target = Path(target)
    check_output(target, overwrite=True, file=True)   # a file replaces a file, never a directory
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _chmod_default(tmp)
        fault_point("atomic_path:before-rename")
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        code = _full_errno(e)
        if code is not None:
            raise _disk_full(target, code) from None
        raise


@contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: temporary paths beside each target, all
    renamed into place when the block succeeds, in the order given and with nothing between the
    renames (name last the file whose presence says the set is complete); all removed otherwise."""
    paths = [Path(t) for t in targets]
    for t in paths:
        check_output(t, overwrite=True, file=True)
        t.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(t)
    tmps: list[Path] = []
    try:
        for t in paths:
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(t), dir=t.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _chmod_default(str(tmp))
        fault_point("atomic_paths:before-rename")
        while tmps:
            os.replace(tmps[0], paths[len(paths) - len(tmps)])
            tmps.pop(0)
    except BaseException as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        code = _full_errno(e)
        if code is not None:
            raise _disk_full(paths[-1], code) from None
        raise


def _umask() -> int:
    """The process umask, read, not set-and-restore: os.umask is process-wide and threads may be
    creating files."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _chmod_default(path: str) -> None:
    """mkstemp creates files readable by the owner only; give them the usual umask permissions."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``target`` and rename it over ``target`` when closed cleanly.
    It replaces what is there: a user-facing output is checked first with :func:`check_output`."""
    with atomic_path(target) as tmp, open(tmp, mode) as f:
        yield f
