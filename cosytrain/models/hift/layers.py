"""Building blocks of the HiFT vocoder: Snake activation, (causal) convolutions and residual blocks.

Parameter names and shapes follow upstream CosyVoice (``cosyvoice/transformer/activation.py``,
``cosyvoice/transformer/convolution.py``, ``cosyvoice/hifigan/generator.py``) so state dicts load
strictly; the arithmetic follows the same operation order so numbers match to float32 rounding.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.hift.weight_norm import weight_norm


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 odd-kernel conv."""
    return int((kernel_size * dilation - dilation) / 2)


def upstream_init_weights(module: nn.Module, mean: float = 0.0, std: float = 0.01) -> None:
    """Upstream's ``init_weights`` (HiFi-GAN N(0, 0.01) for convs), applied to the same modules.

    Upstream only applies it to weight-normed convs, where ``weight`` is recomputed from g and v on
    every access, so the fill lands in a temporary and the parameters keep PyTorch's default init.
    It still draws from the global RNG; we keep the call so that a seeded build draws exactly the
    numbers upstream's does (and therefore produces the same initial weights).
    """
    if "Conv" in type(module).__name__:
        module.weight.data.normal_(mean, std)


class Snake(nn.Module):
    """x + 1/alpha * sin^2(alpha x) with one alpha per channel (BigVGAN); input (B, C, T)."""

    def __init__(self, in_features: int, alpha: float = 1.0, alpha_trainable: bool = True,
                 alpha_logscale: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.alpha_logscale = alpha_logscale
        init = torch.zeros(in_features) if alpha_logscale else torch.ones(in_features)
        self.alpha = nn.Parameter(init * alpha, requires_grad=alpha_trainable)
        self.no_div_by_zero = 1e-9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        if self.alpha_logscale:
            alpha = torch.exp(alpha)
        return x + (1.0 / (alpha + self.no_div_by_zero)) * torch.pow(torch.sin(x * alpha), 2)


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv padded on one side only, so output length equals input length.

    ``causal_type='left'`` looks only at the past; ``'right'`` looks only ahead (used for look-ahead
    context in streaming). ``cache`` replaces the zero padding with real neighbouring frames.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True,
                 causal_type: Literal["left", "right"] = "left") -> None:
        if stride != 1:
            raise ConfigurationError(f"CausalConv1d: stride must be 1, got {stride}; use CausalConv1dDownSample")
        if causal_type not in ("left", "right"):
            raise ConfigurationError(f"CausalConv1d: causal_type must be 'left' or 'right', got {causal_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0,
                         dilation=dilation, groups=groups, bias=bias)
        self.causal_padding = int((kernel_size * dilation - dilation) / 2) * 2 + (kernel_size + 1) % 2
        self.causal_type = causal_type

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is None or cache.size(-1) == 0:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.causal_padding)
        x = torch.cat([cache, x] if self.causal_type == "left" else [x, cache], dim=2)
        return super().forward(x)


class CausalConv1dDownSample(nn.Conv1d):
    """Strided conv with ``stride - 1`` frames of left padding (causal downsampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = True) -> None:
        if stride == 1 or kernel_size % stride != 0:
            raise ConfigurationError(f"CausalConv1dDownSample: need stride > 1 dividing kernel_size, got"
                                     f" k={kernel_size}, s={stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=bias)
        self.causal_padding = stride - 1

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is None or cache.size(-1) == 0:
            x = F.pad(x, (self.causal_padding, 0), value=0.0)
        else:
            x = torch.cat([cache, x], dim=2)
        return super().forward(x)


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest-neighbour upsampling followed by a left-causal conv (v3's replacement for ConvTranspose1d).

    It is a Conv1d, so its weight is (out, in, k) and weight norm's g has ``out`` rows.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, padding=0, bias=bias)
        self.causal_padding = kernel_size - 1
        self.upsample = nn.Upsample(scale_factor=stride, mode="nearest")

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.upsample(x)
        if cache is None or cache.size(-1) == 0:
            x = F.pad(x, (self.causal_padding, 0), value=0.0)
        else:
            x = torch.cat([cache, x], dim=2)
        return super().forward(x)


class ResBlock(nn.Module):
    """HiFi-GAN/BigVGAN residual block: per dilation, Snake -> conv(d) -> Snake -> conv(1), plus skip."""

    def __init__(self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5),
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.convs1 = nn.ModuleList()
        self.convs2 = nn.ModuleList()
        for dilation in dilations:
            self.convs1.append(weight_norm(self._conv(channels, kernel_size, dilation, causal)))
            self.convs2.append(weight_norm(self._conv(channels, kernel_size, 1, causal)))
        self.convs1.apply(upstream_init_weights)
        self.convs2.apply(upstream_init_weights)
        self.activations1 = nn.ModuleList([Snake(channels) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(channels) for _ in dilations])

    @staticmethod
    def _conv(channels: int, kernel_size: int, dilation: int, causal: bool) -> nn.Conv1d:
        if causal:
            return CausalConv1d(channels, channels, kernel_size, 1, dilation=dilation, causal_type="left")
        return nn.Conv1d(channels, channels, kernel_size, 1, dilation=dilation,
                         padding=get_padding(kernel_size, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            xt = conv2(act2(conv1(act1(x))))
            x = xt + x
        return x


def fp32_region(x: torch.Tensor) -> torch.autocast:
    """An autocast-off region for ``x``'s device: phase sums, STFT and iSTFT lose too much in FP16.

    Code inside must also cast its inputs with ``.float()``; disabling autocast alone does not
    convert tensors that are already half precision.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)
