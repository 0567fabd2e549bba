"""Positional encodings used by the ESPnet-style encoders (names as upstream's ``*_CLASSES``).

The sinusoid tables are plain attributes, not buffers, so they are not in any state dict
(upstream's keys) and are not converted by ``module.half()``. They are always built and
kept in float32; only the slice handed out follows the input's dtype. (Upstream's
``EspnetRelPositionalEncoding`` re-casts its cached table to the input dtype, so one FP16
call would leave a rounded table behind for later FP32 calls; we avoid that.)
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from .precision import match_dtype

Offset = Union[int, torch.Tensor]


def _sinusoid_table(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """(len(positions), d_model) float32 table: sin on even, cos on odd channels."""
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model)
    )
    table = torch.zeros(positions.size(0), d_model)
    angles = positions.unsqueeze(1) * div_term
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class PositionalEncoding(torch.nn.Module):
    """Absolute sinusoid encoding added to ``x * sqrt(d_model)`` (``abs_pos``)."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000, reverse: bool = False):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(self.d_model)
        self.dropout = torch.nn.Dropout(p=dropout_rate)
        self.max_len = max_len
        positions = torch.arange(0, max_len, dtype=torch.float32)
        self.pe = _sinusoid_table(positions, d_model).unsqueeze(0)

    def forward(self, x: torch.Tensor, offset: Offset = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        self.pe = self.pe.to(x.device)
        pos_emb = match_dtype(self.position_encoding(offset, x.size(1), False), x)
        x = x * self.xscale + pos_emb
        return self.dropout(x), self.dropout(pos_emb)

    def position_encoding(self, offset: Offset, size: int, apply_dropout: bool = True) -> torch.Tensor:
        """Encoding for positions ``offset .. offset + size`` (offset may be per-batch)."""
        if isinstance(offset, int) or (isinstance(offset, torch.Tensor) and offset.dim() == 0):
            if int(offset) + size > self.max_len:
                raise ValueError(
                    f"sequence of {int(offset) + size} frames exceeds the positional table "
                    f"({self.max_len}); shorten the input"
                )
            pos_emb = self.pe[:, int(offset): int(offset) + size]
        else:
            if int(torch.max(offset)) + size > self.max_len:
                raise ValueError(f"sequence exceeds the positional table ({self.max_len}); shorten the input")
            index = offset.unsqueeze(1) + torch.arange(0, size, device=offset.device)
            index = index * (index > 0)
            pos_emb = F.embedding(index, self.pe[0].to(index.device))
        if apply_dropout:
            pos_emb = self.dropout(pos_emb)
        return pos_emb


class RelPositionalEncoding(PositionalEncoding):
    """``rel_pos``: scales x and returns the (unadded) absolute table for rel. attention."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000):
        super().__init__(d_model, dropout_rate, max_len, reverse=True)

    def forward(self, x: torch.Tensor, offset: Offset = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        self.pe = self.pe.to(x.device)
        x = x * self.xscale
        pos_emb = match_dtype(self.position_encoding(offset, x.size(1), False), x)
        return self.dropout(x), self.dropout(pos_emb)


class NoPositionalEncoding(torch.nn.Module):
    """``no_pos``: identity (plus dropout) and a zero positional tensor."""

    def __init__(self, d_model: int, dropout_rate: float):
        super().__init__()
        self.d_model = d_model
        self.dropout = torch.nn.Dropout(p=dropout_rate)

    def forward(self, x: torch.Tensor, offset: Offset = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        pos_emb = torch.zeros(1, x.size(1), self.d_model, device=x.device)
        return self.dropout(x), pos_emb

    def position_encoding(self, offset: Offset, size: int) -> torch.Tensor:
        return torch.zeros(1, size, self.d_model)


class EspnetRelPositionalEncoding(torch.nn.Module):
    """``rel_pos_espnet``: relative positions +(T-1) .. -(T-1), for the shift trick.

    ``position_encoding`` ignores ``offset`` and returns the 2*size-1 centred window, as
    upstream; incremental decoding relies on exactly that.
    """

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(self.d_model)
        self.dropout = torch.nn.Dropout(p=dropout_rate)
        self.pe: torch.Tensor | None = None
        self.extend_pe(torch.tensor(0.0).expand(1, max_len))

    def extend_pe(self, x: torch.Tensor) -> None:
        """Grow the float32 table to cover 2 * x.size(1) - 1 relative positions."""
        if self.pe is not None and self.pe.size(1) >= x.size(1) * 2 - 1:
            if self.pe.device != x.device:
                self.pe = self.pe.to(device=x.device)
            return
        positions = torch.arange(0, x.size(1), dtype=torch.float32)
        pe_positive = _sinusoid_table(positions, self.d_model)
        pe_negative = _sinusoid_table(-1 * positions, self.d_model)
        pe_positive = torch.flip(pe_positive, [0]).unsqueeze(0)
        pe_negative = pe_negative[1:].unsqueeze(0)
        self.pe = torch.cat([pe_positive, pe_negative], dim=1).to(device=x.device)

    def forward(self, x: torch.Tensor, offset: Offset = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        self.extend_pe(x)
        x = x * self.xscale
        pos_emb = match_dtype(self.position_encoding(size=x.size(1), offset=offset), x)
        return self.dropout(x), self.dropout(pos_emb)

    def position_encoding(self, offset: Offset, size: int) -> torch.Tensor:
        assert self.pe is not None
        centre = self.pe.size(1) // 2
        return self.pe[:, centre - size + 1: centre + size]
