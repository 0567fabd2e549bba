"""Token look-ahead convolution of CosyVoice 2/3.

Upstream: ``cosyvoice.transformer.upsample_encoder.PreLookaheadLayer``.

Each token frame is mixed with the next ``pre_lookahead_len`` frames (conv1 over a right-padded
input), then with the two previous ones (conv2 over a left-padded input), plus a residual. That
fixed right context is why streaming synthesis holds back the last ``pre_lookahead_len`` tokens of
a chunk and passes them as ``context`` instead of zero padding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError


class PreLookaheadLayer(nn.Module):
    """``conv1``: in -> channels, kernel ``pre_lookahead_len + 1``; ``conv2``: channels -> in, kernel 3.

    v2 builds it inside the encoder as (512, 512, 3); v3 as a flow submodule (80, 1024, 3).
    """

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1):
        super().__init__()
        if pre_lookahead_len < 0:
            raise ConfigurationError(f"pre_lookahead_len must be >= 0, got {pre_lookahead_len}")
        self.in_channels = in_channels
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1, stride=1, padding=0)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3, stride=1, padding=0)

    def forward(self, inputs: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs (B, T, in); context (B, pre_lookahead_len, in) are the real next frames, or None.

        Returns (B, T, in). Without context the look-ahead sees zeros, as at the end of an utterance.
        """
        outputs = inputs.transpose(1, 2).contiguous()
        if context is None or context.size(1) == 0:
            outputs = F.pad(outputs, (0, self.pre_lookahead_len), mode="constant", value=0.0)
        else:
            if self.training:
                raise RuntimeError("PreLookaheadLayer: context is for streaming inference; call eval() first")
            if context.size(1) != self.pre_lookahead_len:
                raise ValueError(f"PreLookaheadLayer: context has {context.size(1)} frames, expected "
                                 f"pre_lookahead_len={self.pre_lookahead_len}")
            outputs = torch.cat([outputs, context.transpose(1, 2).to(outputs.dtype)], dim=2)
        outputs = F.leaky_relu(self.conv1(outputs))
        outputs = F.pad(outputs, (self.conv2.kernel_size[0] - 1, 0), mode="constant", value=0.0)
        outputs = self.conv2(outputs).transpose(1, 2).contiguous()
        return outputs + inputs


__all__ = ["PreLookaheadLayer"]
