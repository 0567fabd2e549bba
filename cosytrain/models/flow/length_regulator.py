"""Token-rate to mel-rate resampling (upstream ``cosyvoice.flow.length_regulator``).

CosyVoice 1 tokens are 50 Hz (or 25 Hz) and mels are 22050/256 ≈ 86.13 Hz, so the encoder output is
linearly interpolated to the mel length and smoothed by a small conv stack.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.models.transformer.mask import make_pad_mask


class InterpolateRegulator(nn.Module):
    """Linear interpolation to the target length, then [Conv(k3), GroupNorm, Mish] x N and a 1x1 conv.

    ``model`` is an ``nn.Sequential`` so the keys are ``model.0``, ``model.1`` ... ``model.{3N}`` as upstream.
    """

    def __init__(self, channels: int, sampling_ratios: Sequence[int], out_channels: Optional[int] = None,
                 groups: int = 1):
        super().__init__()
        self.sampling_ratios = sampling_ratios
        out_channels = out_channels or channels
        layers = []
        for _ in sampling_ratios:
            layers.extend([nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()])
        layers.append(nn.Conv1d(channels, out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, ylens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T_tok, C); ylens: (B,) mel lengths. Returns ((B, max(ylens), C) masked, ylens)."""
        mask = (~make_pad_mask(ylens)).to(x).unsqueeze(-1)
        x = F.interpolate(x.transpose(1, 2).contiguous(), size=int(ylens.max()), mode="linear")
        out = self.model(x).transpose(1, 2).contiguous()
        return out * mask, ylens

    def inference(self, x1: torch.Tensor, x2: torch.Tensor, mel_len1: int, mel_len2: int,
                  input_frame_rate: int = 50) -> Tuple[torch.Tensor, int]:
        """Interpolate the prompt ``x1`` and the target ``x2`` (B, T, C) separately.

        Keeping them apart gives a clean mel boundary at ``mel_len1``. Targets longer than 40 tokens
        interpolate their first and last 20 tokens to a fixed ``int(20 / rate * 22050 / 256)`` frames
        each, so consecutive v1 streaming chunks overlap consistently (the flow cache keeps 34 frames).
        """
        if x2.shape[1] > 40:
            edge = int(20 / input_frame_rate * 22050 / 256)
            head = F.interpolate(x2[:, :20].transpose(1, 2).contiguous(), size=edge, mode="linear")
            mid = F.interpolate(x2[:, 20:-20].transpose(1, 2).contiguous(), size=mel_len2 - 2 * edge, mode="linear")
            tail = F.interpolate(x2[:, -20:].transpose(1, 2).contiguous(), size=edge, mode="linear")
            x2 = torch.cat([head, mid, tail], dim=2)
        else:
            x2 = F.interpolate(x2.transpose(1, 2).contiguous(), size=mel_len2, mode="linear")
        if x1.shape[1] != 0:
            x1 = F.interpolate(x1.transpose(1, 2).contiguous(), size=mel_len1, mode="linear")
            x = torch.cat([x1, x2], dim=2)
        else:
            x = x2
        out = self.model(x).transpose(1, 2).contiguous()
        return out, mel_len1 + mel_len2
