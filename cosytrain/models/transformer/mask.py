"""Padding and chunk attention masks, with upstream CosyVoice's semantics.

All masks are boolean with ``True`` meaning "may attend / is a real frame", except
:func:`make_pad_mask`, which (as upstream) is ``True`` on padding.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """``(B, T)`` bool mask that is ``True`` on padded positions.

    ``max_len <= 0`` means ``lengths.max()``.
    """
    batch = lengths.size(0)
    max_len = max_len if max_len > 0 else int(lengths.max().item())
    positions = torch.arange(0, max_len, dtype=torch.int64, device=lengths.device)
    return positions.unsqueeze(0).expand(batch, max_len) >= lengths.unsqueeze(-1)


def subsequent_mask(size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Lower-triangular ``(size, size)`` mask: step i sees steps 0..i."""
    positions = torch.arange(size, device=device)
    return positions.expand(size, size) <= positions.unsqueeze(-1)


def subsequent_chunk_mask(
    size: int,
    chunk_size: int,
    num_left_chunks: int = -1,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """``(size, size)`` mask where step i sees every step up to the end of its chunk.

    ``num_left_chunks`` is accepted but ignored: upstream replaced the loop version with
    this vectorised (ONNX-exportable) one that always sees all left chunks, so we do the
    same to keep the numbers identical.
    """
    del num_left_chunks  # upstream ignores it too (see docstring)
    positions = torch.arange(size, device=device)
    chunk_end = (torch.div(positions, chunk_size, rounding_mode="trunc") + 1) * chunk_size
    return positions.unsqueeze(0) < chunk_end.unsqueeze(1)


def add_optional_chunk_mask(
    xs: torch.Tensor,
    masks: torch.Tensor,
    use_dynamic_chunk: bool,
    use_dynamic_left_chunk: bool,
    decoding_chunk_size: int,
    static_chunk_size: int,
    num_decoding_left_chunks: int,
    enable_full_context: bool = True,
) -> torch.Tensor:
    """Combine the padding mask ``masks`` (B, 1, L) with a (dynamic or static) chunk mask.

    Returns (B, L, L) when a chunk mask applies, else ``masks`` itself. Dynamic chunk sizes
    during training draw from the global torch RNG exactly as upstream does. Rows that end
    up all-False are set all-True (upstream does this so softmax never sees a fully masked
    row; those rows are padding and are masked later).
    """
    if use_dynamic_chunk:
        max_len = xs.size(1)
        if decoding_chunk_size < 0:
            chunk_size, num_left_chunks = max_len, -1
        elif decoding_chunk_size > 0:
            chunk_size, num_left_chunks = decoding_chunk_size, num_decoding_left_chunks
        else:
            # Either full context or a chunk of 1..25 frames (upstream's training recipe).
            chunk_size = int(torch.randint(1, max_len, (1,)).item())
            num_left_chunks = -1
            if chunk_size > max_len // 2 and enable_full_context:
                chunk_size = max_len
            else:
                chunk_size = chunk_size % 25 + 1
                if use_dynamic_left_chunk:
                    max_left_chunks = (max_len - 1) // chunk_size
                    num_left_chunks = int(torch.randint(0, max_left_chunks, (1,)).item())
        chunk_masks = masks & subsequent_chunk_mask(
            xs.size(1), chunk_size, num_left_chunks, xs.device
        ).unsqueeze(0)
    elif static_chunk_size > 0:
        chunk_masks = masks & subsequent_chunk_mask(
            xs.size(1), static_chunk_size, num_decoding_left_chunks, xs.device
        ).unsqueeze(0)
    else:
        chunk_masks = masks
    if chunk_masks.dtype != torch.bool:
        raise TypeError(f"chunk mask must be bool, got {chunk_masks.dtype}; pass bool padding masks")
    empty_rows = chunk_masks.sum(dim=-1) == 0
    if bool(empty_rows.any()):
        logger.debug("chunk mask has all-False rows; setting them True (they are padding)")
        # In place, as upstream: without a chunk mask this also edits the caller's ``masks``
        # (a zero-length sample then reads as fully valid), which changes what encoders return.
        chunk_masks[empty_rows] = True
    return chunk_masks
