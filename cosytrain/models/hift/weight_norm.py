"""Weight normalisation with upstream's state-dict layout, and hift checkpoint key clean-up.

Upstream wraps every vocoder conv with ``torch.nn.utils.parametrizations.weight_norm``, so its keys are
``<conv>.parametrizations.weight.original0`` (g) and ``.original1`` (v). Torch registers a load hook for
that parametrization which renames the older ``weight_g`` / ``weight_v`` names, so checkpoints saved
with the deprecated ``torch.nn.utils.weight_norm`` load with ``strict=True`` unchanged.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _parametrized_weight_norm

M = TypeVar("M", bound=nn.Module)

GENERATOR_PREFIX = "generator."


def weight_norm(module: M, dim: int = 0) -> M:
    """Parametrize ``module.weight`` as g * v / ||v|| (dim 0 of the stored weight, as upstream)."""
    return _parametrized_weight_norm(module, name="weight", dim=dim)


def strip_generator_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``generator.`` from every key (a hift saved inside a HiFiGan wrapper).

    Upstream's ``CosyVoiceModel.load`` does ``k.replace('generator.', '')`` on every key; no hift key
    contains that text elsewhere, so removing the prefix is the same mapping. Keys without the prefix
    are kept as they are, so a plain hift state dict passes through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key[len(GENERATOR_PREFIX):] if key.startswith(GENERATOR_PREFIX) else key
        if new_key in out:
            raise ValueError(f"hift state dict: key {new_key!r} appears with and without the 'generator.' prefix; keep one copy")
        out[new_key] = value
    return out
