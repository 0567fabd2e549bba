"""ESPnet-style transformer parts, state-dict and numerically compatible with upstream CosyVoice."""

from .encoder import BaseEncoder, ConformerEncoder, TransformerEncoder
from .mask import add_optional_chunk_mask, make_pad_mask, subsequent_chunk_mask, subsequent_mask

__all__ = [
    "BaseEncoder",
    "ConformerEncoder",
    "TransformerEncoder",
    "add_optional_chunk_mask",
    "make_pad_mask",
    "subsequent_chunk_mask",
    "subsequent_mask",
]
