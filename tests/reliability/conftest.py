"""``small_disk``: a 2 MiB tmpfs (a real ENOSPC), or a simulated one where mounting is refused."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.reliability import _hooks


def _try_mount(folder: Path) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture()
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a 2 MiB file system; ``_hooks.fill_disk(folder)`` leaves it (nearly) full.

    Without root (or where the sandbox refuses ``mount``) the folder is an ordinary one and
    ``fill_disk`` instead makes every later ``os.fsync`` raise ENOSPC, the point where a write's
    missing space is reported at the latest; the test then says ``simulated`` in its id-less output.
    """
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if _try_mount(folder):
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
        return
    real_fsync = os.fsync

    def arm() -> None:
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)

    _hooks.SIMULATED[folder] = arm
    print("small_disk: tmpfs not mountable here, ENOSPC simulated at fsync")
    try:
        yield folder
    finally:
        _hooks.SIMULATED.pop(folder, None)
        monkeypatch.setattr(os, "fsync", real_fsync)
