"""Label-smoothed cross entropy as upstream's ``LabelSmoothingLoss`` (KL to a smoothed target).

The log-softmax runs in float32 even when the logits come from FP16 autocast, so the loss
of a mixed-precision step is not rounded to half precision.
"""

from __future__ import annotations

import torch
from torch import nn


class LabelSmoothingLoss(nn.Module):
    """Sum over non-padding frames of KL(smoothed one-hot || softmax(x)), normalised.

    ``normalize_length=True`` divides by the number of non-padding targets, otherwise by the
    batch size. With ``smoothing=0`` this is the mean token cross entropy.
    """

    def __init__(self, size: int, padding_idx: int, smoothing: float, normalize_length: bool = False):
        super().__init__()
        self.criterion = nn.KLDivLoss(reduction="none")
        self.padding_idx = padding_idx
        self.confidence = 1.0 - smoothing
        self.smoothing = smoothing
        self.size = size
        self.normalize_length = normalize_length

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """x (batch, seqlen, size) logits; target (batch, seqlen) with padding_idx on padding."""
        if x.size(2) != self.size:
            raise ValueError(f"logits have {x.size(2)} classes but the loss was built for {self.size}")
        batch_size = x.size(0)
        x = x.reshape(-1, self.size).float()
        target = target.reshape(-1)
        true_dist = torch.full_like(x, self.smoothing / (self.size - 1))
        ignore = target == self.padding_idx
        total = len(target) - int(ignore.sum().item())
        target = target.masked_fill(ignore, 0)
        true_dist.scatter_(1, target.unsqueeze(1), self.confidence)
        kl = self.criterion(torch.log_softmax(x, dim=1), true_dist)
        denom = total if self.normalize_length else batch_size
        return kl.masked_fill(ignore.unsqueeze(1), 0).sum() / denom
