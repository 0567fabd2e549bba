"""Test-only plugins handed to a ``python -m cosytrain fit`` subprocess through its recipe.

Monkeypatching does not cross a process boundary, so the fault is planted by a CheckpointIO class
named in ``tests/reliability/tiny_llm_recipe.yaml`` and armed by an environment variable.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from cosytrain.tasks.checkpoint_io import AtomicCheckpointIO
from cosytrain.utils.atomic import atomic_open

PAUSE_ENV = "COSYTRAIN_TEST_PAUSE_SAVE"  # "<global_step>:<marker file>"


class PausingCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` that, when armed, stops HALF-WAY through writing ``last.ckpt`` at one step.

    It writes the first half of the bytes into the temp file (the same ``atomic_open`` the real save
    uses), flushes, creates the marker file and sleeps, so the test can SIGKILL it mid-write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        spec = os.environ.get(PAUSE_ENV, "")
        if spec and Path(path).name == "last.ckpt":
            step, marker = spec.split(":", 1)
            if int(checkpoint.get("global_step", -1)) == int(step):
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                with atomic_open(path, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    Path(marker).write_text(str(path))
                    time.sleep(600)  # killed here
                    handle.write(data[len(data) // 2:])
                return
        super().save_checkpoint(checkpoint, path, storage_options)


class FillDiskAfterStep(pl.Callback):
    """Once ``step`` optimizer steps are done (and their checkpoint saved), fills the file system of
    ``path`` up to ``leave`` bytes, so the next checkpoint write hits ENOSPC."""

    def __init__(self, path: str, step: int = 1, leave: int = 4096) -> None:
        self.path, self.step, self.leave = Path(path), int(step), int(leave)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not (self.path / "filler").exists():
            fill_disk(self.path, self.leave)


# folders standing in for a small disk where tmpfs cannot be mounted: fill_disk arms a fake ENOSPC
SIMULATED: dict[Path, Any] = {}


def fill_disk(folder: Path, leave: int = 4096) -> None:
    """Write ``folder/filler`` until ``leave`` bytes are free (or the disk is full)."""
    folder = Path(folder)
    if folder in SIMULATED:
        SIMULATED[folder]()
        return
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as handle:
        try:
            handle.write(b"\0" * max(0, free - leave))
            handle.flush()
        except OSError:
            pass
