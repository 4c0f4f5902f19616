"""Write outputs to a temporary path and rename them into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workbench.errors import WorkbenchError


class OutputExistsError(WorkbenchError, FileExistsError):
    """An output path that already holds something, and no permission to replace it."""


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the output gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed over it when the block succeeds (removed otherwise),
    for writers that open their output by path themselves (gguf's); `atomic_file` builds on it."""
    target = Path(target)
    check_output(target, overwrite=True, file=True)   # a file replaces a file, never a directory
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
