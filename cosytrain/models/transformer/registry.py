"""The string -> class tables that upstream configs use (``cosyvoice/utils/class_utils.py``).

An unknown name in a config fails with a message listing the accepted ones.
"""

from __future__ import annotations

from typing import Dict, Type

import torch

from .attention import MultiHeadedAttention, RelPositionMultiHeadedAttention
from .embedding import (
    EspnetRelPositionalEncoding,
    NoPositionalEncoding,
    PositionalEncoding,
    RelPositionalEncoding,
)
from .subsampling import (
    Conv1dSubsampling2,
    Conv2dSubsampling4,
    Conv2dSubsampling6,
    Conv2dSubsampling8,
    EmbedinigNoSubsampling,
    LegacyLinearNoSubsampling,
    LinearNoSubsampling,
)

from cosytrain.errors import ConfigurationError

COSYVOICE_ACTIVATION_CLASSES: Dict[str, Type[torch.nn.Module]] = {
    "hardtanh": torch.nn.Hardtanh,
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "selu": torch.nn.SELU,
    "swish": torch.nn.SiLU,
    "gelu": torch.nn.GELU,
}

COSYVOICE_SUBSAMPLE_CLASSES: Dict[str, Type[torch.nn.Module]] = {
    "linear": LinearNoSubsampling,
    "linear_legacy": LegacyLinearNoSubsampling,
    "embed": EmbedinigNoSubsampling,
    "conv1d2": Conv1dSubsampling2,
    "conv2d": Conv2dSubsampling4,
    "conv2d6": Conv2dSubsampling6,
    "conv2d8": Conv2dSubsampling8,
}

COSYVOICE_EMB_CLASSES: Dict[str, Type[torch.nn.Module]] = {
    "embed": PositionalEncoding,
    "abs_pos": PositionalEncoding,
    "rel_pos": RelPositionalEncoding,
    "rel_pos_espnet": EspnetRelPositionalEncoding,
    "no_pos": NoPositionalEncoding,
}

COSYVOICE_ATTENTION_CLASSES: Dict[str, Type[torch.nn.Module]] = {
    "selfattn": MultiHeadedAttention,
    "rel_selfattn": RelPositionMultiHeadedAttention,
}


def lookup(table: Dict[str, Type[torch.nn.Module]], name: str, what: str) -> Type[torch.nn.Module]:
    """``table[name]`` or a one-line error naming the option and its accepted values."""
    try:
        return table[name]
    except KeyError:
        raise ConfigurationError(f"unknown {what} {name!r}; use one of {sorted(table)}") from None
