"""Atomic writes: a reader sees the old file or the new one, never half of one.

What lands has the modes a plain write would give (files 0666, directories 0777, less the umask),
not the private 0600/0700 of the temporary names.

Checkpoints and exports are the only copy of days of GPU time, so every write goes to a temporary
file in the same directory, is flushed and fsync'ed, and is renamed over the target with
``os.replace`` (atomic on POSIX within one file system). On any error (ENOSPC included) the
temporary file is removed, the previous target is left untouched, and the error names the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


class AtomicWriteError(OSError):
    """Raised when an atomic write fails; the previous file (if any) is intact."""


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/file system allows opening a dir.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(root: Path) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700 entries; what is renamed into place gets the modes a
    plain ``open``/``mkdir`` would give (0644/0755 under the usual umask 022), so others on a shared
    machine can read a model or checkpoint as they read any file."""
    mask = _umask()
    if root.is_dir():
        os.chmod(root, 0o777 & ~mask)
        for path in root.rglob("*"):
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(root, 0o666 & ~mask)


def _describe(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on device; the previous file is intact - free space and retry"
    return f"{path}: write failed ({exc.strerror or exc}); the previous file is intact"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'wb' and 'w', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle  # type: ignore[misc]
            handle.flush()
            os.fsync(handle.fileno())
        _normal_modes(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AtomicWriteError(exc.errno or 0, _describe(exc, target)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class _WriteErrorRecorder:
    """Forwards writes to ``handle`` and keeps the first ``OSError``: torch's zip writer rewords a failed
    write as ``RuntimeError: ... unexpected pos``, and the errno (ENOSPC) is what must be reported."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` streamed into a temporary sibling, then renamed over ``path``.

    Nothing is serialised into memory first (a checkpoint with optimizer state is several GB, and a
    buffer would hold it twice at every save); a pickling error or a full disk removes the temporary
    file and leaves ``path`` as it was, and a failed write surfaces as its ``OSError`` (one line, via
    ``AtomicWriteError``), not as torch's "unexpected pos".
    """
    import torch

    with atomic_open(path, "wb") as handle:
        sink = _WriteErrorRecorder(handle)
        try:
            torch.save(obj, sink)
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise


def atomic_directory(target: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build a directory with ``fill(tmp_dir)``, then move it into place in one rename.

    With ``overwrite`` an existing ``target`` is swapped out (renamed aside, then removed) only after the
    new directory is complete, so a failure at any point leaves the old directory as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; choose another output or pass overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        _normal_modes(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the previous directory back
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AtomicWriteError(exc.errno or 0, _describe(exc, target)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
