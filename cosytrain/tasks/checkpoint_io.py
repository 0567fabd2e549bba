"""Checkpoint files that are whole or absent, never half written.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary
file in the SYSTEM temp folder, which is then moved onto the target. When that folder is on another
file system than the run folder (a tmpfs ``/tmp``, a network or scratch disk for runs), the move is a
copy INTO the target path: a kill or a full disk during that copy leaves a truncated ``last.ckpt``
and the previous one is already gone, and a kill before it leaves a stray temp file in ``/tmp``.
Nothing is fsync'ed either. ``AtomicCheckpointIO`` writes a temporary sibling of the target, fsyncs
it and renames it over the target (``cosytrain.utils.atomic``), so a reader -- ``--ckpt_path last``
after a crash -- sees the previous checkpoint or the new one, and ENOSPC is one clear line naming
the file with the previous checkpoint left intact.

``prepare_trainer_kwargs`` (``lightning_cli``) installs it unless a recipe brings its own
``CheckpointIO`` plugin or the strategy writes checkpoint folders itself (DeepSpeed, FSDP, XLA).
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from cosytrain.errors import ConfigurationError
from cosytrain.utils.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose save is a same-directory temp file + fsync + ``os.replace``, and whose
    load is always ``weights_only=True``: Lightning before 2.6 loads ``ckpt_path`` with
    ``weights_only=False``, which runs any code pickled into the file (seen with 2.5.0)."""

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        import torch
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} not found")
        with fs.open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise ConfigurationError(f"{type(self).__name__} does not take storage_options; drop them or bring your own"
                                     " CheckpointIO plugin")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, target)  # raises AtomicWriteError (an OSError) naming the path
        _umask_mode(target)
        # a writer killed mid-save leaves its temp sibling behind; one process (rank 0) writes a given
        # checkpoint, so once this save has landed any other temp of the same target is such a leftover
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def _umask_mode(path: Path) -> None:
    """The temp file is created 0600; give the checkpoint the mode a plain open() would (Lightning's)."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~mask)


def wants_atomic_io(trainer_kwargs: dict[str, Any]) -> bool:
    """True when the Trainer should get ``AtomicCheckpointIO``: no CheckpointIO plugin yet and a
    strategy that saves single files (not DeepSpeed/FSDP/XLA, which write their own folders)."""
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    plugins = trainer_kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return False
    strategy = trainer_kwargs.get("strategy")
    if strategy is not None and not isinstance(strategy, str) and getattr(strategy, "_checkpoint_io", None):
        return False  # a Strategy object configured with its own checkpoint_io
    name = str(strategy if isinstance(strategy, str) or strategy is None else type(strategy).__name__).lower()
    return not any(word in name for word in ("deepspeed", "fsdp", "xla"))
