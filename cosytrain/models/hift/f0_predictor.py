"""Mel -> F0 (Hz per frame) predictors of the HiFT vocoder.

``ConvRNNF0Predictor`` (v1/v2): five weight-normed k=3 convs with ELU, then a linear layer and abs.
``CausalConvRNNF0Predictor`` (v3): the same stack with one-sided padding; the first conv looks
``causal_padding`` (3) frames ahead, which a streaming caller passes as real context.
Module indices (``condnet.0``, ``condnet.2``, ...) match upstream's ``nn.Sequential``.
"""

from __future__ import annotations

import torch
from torch import nn

from cosytrain.models.hift.layers import CausalConv1d
from cosytrain.models.hift.weight_norm import weight_norm


class ConvRNNF0Predictor(nn.Module):
    """Non-causal F0 predictor: (B, in_channels, T) mel -> (B, T) non-negative F0."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            conv = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, kernel_size=3, padding=1)
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features=cond_channels, out_features=num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.condnet(x).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


class CausalConvRNNF0Predictor(nn.Module):
    """Causal F0 predictor (v3). ``finalize=False`` treats the last 3 input frames as look-ahead only,
    so the output has T - 3 frames."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = [weight_norm(CausalConv1d(in_channels, cond_channels, kernel_size=4, causal_type="right")),
                                   nn.ELU()]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(cond_channels, cond_channels, kernel_size=3, causal_type="left")),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features=cond_channels, out_features=num_class)

    @property
    def look_ahead(self) -> int:
        """Frames of right context the first conv consumes (3 for k=4)."""
        return self.condnet[0].causal_padding

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        if finalize:
            x = self.condnet[0](x)
        else:
            pad = self.look_ahead
            x = self.condnet[0](x[:, :, :-pad], x[:, :, -pad:])
        for layer in list(self.condnet)[1:]:
            x = layer(x)
        x = x.transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))
