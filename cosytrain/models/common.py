"""Small helpers shared by the models (upstream ``cosyvoice/utils/common.py`` names)."""

from __future__ import annotations

from typing import List

import torch

IGNORE_ID = -1  # target/padding value that the losses and accuracy skip


def pad_list(xs: List[torch.Tensor], pad_value: float) -> torch.Tensor:
    """Stack tensors of different lengths (dim 0) into (B, Tmax, ...) filled with ``pad_value``."""
    if not xs:
        raise ValueError("pad_list needs at least one tensor")
    max_len = max(len(item) for item in xs)
    out = xs[0].new_full((len(xs), max_len, *xs[0].shape[1:]), pad_value)
    for i, item in enumerate(xs):
        out[i, : len(item)] = item
    return out


def th_accuracy(pad_outputs: torch.Tensor, pad_targets: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """Fraction of non-ignored targets whose argmax prediction is right.

    pad_outputs is (B * Lmax, D) and pad_targets (B, Lmax).
    """
    pad_pred = pad_outputs.view(pad_targets.size(0), pad_targets.size(1), pad_outputs.size(1)).argmax(2)
    mask = pad_targets != ignore_label
    numerator = torch.sum(pad_pred.masked_select(mask) == pad_targets.masked_select(mask))
    denominator = torch.sum(mask)
    return (numerator / denominator).detach()
