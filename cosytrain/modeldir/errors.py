"""The errors of :mod:`cosytrain.modeldir`; every message is one line naming the file and the fix."""

from __future__ import annotations

from cosytrain.errors import ConfigurationError

__all__ = ["ModelDirError", "UpstreamConfigError", "StateDictMismatchError"]


class ModelDirError(ConfigurationError):
    """A model directory (or a weights file) was refused; the message is one line (a ``ConfigurationError``:
    the command-line front ends print it as one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class UpstreamConfigError(ModelDirError):
    """An upstream config was refused, cannot be found or cannot be built; the message is one line."""


class StateDictMismatchError(ModelDirError):
    """A state dict does not fit the module it is meant for (keys, shapes or generation)."""
