"""Atomic writes keep the previous file whole when a write fails half-way (ENOSPC included)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from cosytrain.utils import atomic
from cosytrain.utils.atomic import AtomicWriteError, atomic_directory, atomic_torch_save, atomic_write_text


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_enospc_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(AtomicWriteError) as info:
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert "no space left" in str(info.value) and str(target) in str(info.value)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_directory_is_swapped_only_when_complete(tmp_path):
    out = tmp_path / "export"

    def fill_ok(d):
        (d / "llm.pt").write_text("v1")

    atomic_directory(out, fill_ok)
    assert (out / "llm.pt").read_text() == "v1"
    with pytest.raises(FileExistsError):
        atomic_directory(out, fill_ok)

    def fill_fails(d):
        (d / "llm.pt").write_text("half")
        raise RuntimeError("synthesis check failed")

    with pytest.raises(RuntimeError):
        atomic_directory(out, fill_fails, overwrite=True)
    assert (out / "llm.pt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    def fill_v2(d):
        (d / "llm.pt").write_text("v2")

    atomic_directory(out, fill_v2, overwrite=True)
    assert (out / "llm.pt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_rename_restores_previous_directory(tmp_path, monkeypatch):
    out = tmp_path / "export"
    atomic_directory(out, lambda d: (d / "f").write_text("old"))
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the move of the new directory into place
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(AtomicWriteError):
        atomic_directory(out, lambda d: (d / "f").write_text("new"), overwrite=True)
    monkeypatch.undo()
    assert (out / "f").read_text() == "old"


class _FullAfter:
    """A file handle whose disk fills after ``limit`` bytes (a write raises ENOSPC, as a real one would)."""

    def __init__(self, handle, limit: int) -> None:
        self.handle, self.limit, self.written = handle, limit, 0

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.written + size > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_torch_save_streams_and_a_full_disk_mid_write_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FullAfter(real_fdopen(fd, mode), 4096))
    with pytest.raises(AtomicWriteError) as info:
        atomic_torch_save({"w": torch.zeros(100_000)}, target)  # torch itself would say "unexpected pos"
    assert "no space left" in str(info.value) and str(target) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unpicklable_object_leaves_previous_file(tmp_path):
    target = tmp_path / "a.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    with pytest.raises(Exception) as info:
        atomic_torch_save({"w": torch.zeros(2), "f": lambda: None}, target)
    assert not isinstance(info.value, AtomicWriteError)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_torch_save_does_not_hold_a_second_copy_in_memory(tmp_path):
    """Peak RSS while saving 128 MB of tensors grows by far less than the checkpoint (a BytesIO buffer
    plus its ``getvalue()`` copy grew it by twice the checkpoint)."""
    import subprocess
    import sys

    code = f"""
import resource, torch
from cosytrain.utils.atomic import atomic_torch_save
state = {{"w%d" % i: torch.ones(4 * 1024 * 1024) for i in range(8)}}  # 8 x 16 MB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
atomic_torch_save(state, {str(tmp_path / 'big.pt')!r})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 40, grown_mb
    assert torch.load(tmp_path / "big.pt", weights_only=True)["w7"].shape == (4 * 1024 * 1024,)
