"""Conformer convolution module (``use_cnn_module=True``), keys as upstream."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .precision import LayerNorm, autocast_active

from cosytrain.errors import ConfigurationError


class ConvolutionModule(nn.Module):
    """pointwise conv -> GLU -> depthwise conv -> norm -> activation -> pointwise conv.

    With ``causal=True`` the depthwise conv is left-padded by ``kernel_size - 1`` frames (or
    fed the cache of the previous chunk), so no frame sees the future.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 15,
        activation: nn.Module | None = None,
        norm: str = "batch_norm",
        causal: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, kernel_size=1, stride=1, padding=0, bias=bias)
        if causal:
            padding = 0
            self.lorder = kernel_size - 1
        else:
            if (kernel_size - 1) % 2 != 0:
                raise ConfigurationError(f"cnn_module_kernel must be odd for a non-causal conv, got {kernel_size}")
            padding = (kernel_size - 1) // 2
            self.lorder = 0
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, stride=1, padding=padding, groups=channels, bias=bias
        )
        if norm not in ("batch_norm", "layer_norm"):
            raise ConfigurationError(f"cnn_module_norm must be 'batch_norm' or 'layer_norm', got {norm!r}")
        self.use_layer_norm = norm == "layer_norm"
        self.norm = LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, kernel_size=1, stride=1, padding=0, bias=bias)
        self.activation = activation if activation is not None else nn.ReLU()

    def forward(
        self,
        x: torch.Tensor,
        mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
        cache: torch.Tensor = torch.zeros((0, 0, 0)),
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (batch, time, channels) -> (output of the same shape, new left-context cache)."""
        x = x.transpose(1, 2)
        if mask_pad.size(2) > 0:
            x = x.masked_fill(~mask_pad, 0.0)
        if self.lorder > 0:
            if cache.size(2) == 0:
                x = nn.functional.pad(x, (self.lorder, 0), "constant", 0.0)
            else:
                if cache.size(0) != x.size(0) or cache.size(1) != x.size(1):
                    raise ValueError(
                        "cnn cache batch/channels do not match the input; pass the previous chunk's cache"
                    )
                x = torch.cat((cache.to(x.dtype), x), dim=2)
            new_cache = x[:, :, -self.lorder:]
        else:
            new_cache = torch.zeros((0, 0, 0), dtype=x.dtype, device=x.device)

        x = nn.functional.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = self.activation(self.norm(x.transpose(1, 2))).transpose(1, 2)
        else:
            # BatchNorm statistics in float32 under autocast (CPU autocast would keep half).
            x = self.activation(self.norm(x.float() if autocast_active(x) else x))
        x = self.pointwise_conv2(x)
        if mask_pad.size(2) > 0:
            x = x.masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2), new_cache
