"""The one exception of :mod:`cosytrain.export`."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(ValueError):
    """The export was refused or failed its check; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
