"""A task checkpoint's ``state_dict`` -> one plain state dict per part: the prefix split.

Our tasks keep each trained part under the attribute ``llm``, ``flow`` or ``hift``, so a Lightning
checkpoint's ``state_dict`` keys are ``llm.*`` / ``flow.*`` / ``hift.*`` (the vocoder's discriminator
sits under ``discriminator.*`` and is never exported) and export is a prefix split (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cosytrain.export.errors import ExportError
from cosytrain.modeldir import PARTS

__all__ = ["split_parts"]

# Keys of the Lightning module that are never exported (the vocoder's GAN discriminator).
_NEVER_EXPORTED = ("discriminator.",)


def split_parts(state_dict: Mapping[str, Any], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{'llm.x': t}`` -> ``{'llm': {'x': t}}`` for the exportable parts.

    ``torch.compile``'s ``_orig_mod.`` segment is dropped; discriminator and other keys are ignored.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or key.startswith(_NEVER_EXPORTED):
            continue
        key = key.replace("_orig_mod.", "")
        head, _, rest = key.partition(".")
        if head in PARTS and rest:
            parts.setdefault(head, {})[rest] = value
    if not parts:
        shown = ", ".join(list(state_dict)[:3])
        raise ExportError(f"{what}: no llm./flow./hift. weights in the checkpoint (keys look like {shown});"
                          " export needs a checkpoint of a cosytrain task")
    return parts
