"""Building blocks of the flow-matching U-Net estimator: Matcha-TTS's convolutional blocks.

These re-implement Matcha-TTS's ``matcha/models/components/decoder.py`` blocks (time embedding,
ResNet/down/up-sampling blocks and their causal variants) that CosyVoice's ``ConditionalDecoder``
uses; its transformer blocks are :mod:`cosytrain.models.flow.transformer_blocks`. Attribute names
are chosen so that ``state_dict()`` keys equal upstream's (``attn1.to_q``, ``to_out.0``,
``ff.net.0.proj``, ``norm1``, ``block1.block.0`` ...), which is what lets upstream checkpoints load
with ``strict=True``.

Mixed precision: the sinusoidal time embedding and the mask-to-bias conversion are computed in FP32
whatever autocast says; the bias is only cast to the attention dtype at the last moment, saturating
at that dtype's most negative finite value instead of overflowing to ``-inf``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.transformer.precision import LayerNorm as FP32LayerNorm

# Upstream (cosyvoice.utils.common.mask_to_bias) uses this constant; kept for FP32 bit-compatibility.
MASK_BIAS_VALUE = -1.0e10


def mask_to_bias(mask: torch.Tensor) -> torch.Tensor:
    """Turn a boolean attention mask (True = may attend) into an additive FP32 bias.

    Upstream computes ``(1 - mask) * -1e10`` in the activation dtype; in FP16 that overflows to
    ``-inf`` (NaN for fully masked rows), so the bias is always built in FP32 here.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask_to_bias expects a bool mask, got {mask.dtype}; pass mask.bool()")
    return (1.0 - mask.to(torch.float32)) * MASK_BIAS_VALUE


def bias_for(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast an FP32 additive bias to ``dtype`` without producing infinities."""
    if bias.dtype == dtype:
        return bias
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of the flow time ``t`` (Matcha), always returned in FP32.

    ``t`` lies in [0, 1] and is scaled by 1000 before the sin/cos; in FP16 the phases would lose
    about three digits, so autocast is disabled here and the result stays FP32.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 != 0:
            raise ConfigurationError(f"SinusoidalPosEmb dim must be even, got {dim}")
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.ndim < 1:
                x = x.unsqueeze(0)
            half_dim = self.dim // 2
            freq = math.log(10000) / (half_dim - 1)
            freq = torch.exp(torch.arange(half_dim, device=x.device).float() * -freq)
            # same association as upstream: (scale * t) * freq
            emb = scale * x.unsqueeze(1) * freq.unsqueeze(0)
            return torch.cat((emb.sin(), emb.cos()), dim=-1)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """The small subset of diffusers' ``get_activation`` names that the estimators use."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ConfigurationError(f"unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}") from None


class TimestepEmbedding(nn.Module):
    """MLP on the time embedding (Matcha/diffusers ``TimestepEmbedding``)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: Optional[int] = None,
        post_act_fn: Optional[str] = None,
        cond_proj_dim: Optional[int] = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim if out_dim is not None else time_embed_dim)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.act(self.linear_1(sample))
        sample = self.linear_2(sample)
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample


class Block1D(nn.Module):
    """Conv(k=3) -> GroupNorm -> Mish on masked input; output masked again."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two ``Block1D`` with the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = self.make_block(dim, dim_out, groups)
        self.block2 = self.make_block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def make_block(self, dim: int, dim_out: int, groups: int) -> nn.Module:
        """Hook: the causal (v2) resnet swaps in ``CausalBlock1D`` at the same key positions."""
        return Block1D(dim, dim_out, groups=groups)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)
        h = h + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    """Stride-2 conv; an odd length T gives ceil(T/2) frames (the decoder crops on the way up)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """x2 upsampling by transposed conv (default) or nearest + optional conv (Matcha)."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        use_conv_transpose: bool = True,
        out_channels: Optional[int] = None,
        name: str = "conv",
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_conv_transpose = use_conv_transpose
        self.name = name
        self.conv: Optional[nn.Module] = None
        if use_conv_transpose:
            self.conv = nn.ConvTranspose1d(channels, self.out_channels, 4, 2, 1)
        elif use_conv:
            self.conv = nn.Conv1d(channels, self.out_channels, 3, padding=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[1] != self.channels:
            raise ValueError(f"Upsample1D expects {self.channels} channels, got {inputs.shape[1]}")
        if self.use_conv_transpose:
            return self.conv(inputs)
        outputs = F.interpolate(inputs, scale_factor=2.0, mode="nearest")
        if self.use_conv:
            outputs = self.conv(outputs)
        return outputs


# ----------------------------------------------------------------------------------------------
# causal variants (CosyVoice 2 ``CausalConditionalDecoder``)
# ----------------------------------------------------------------------------------------------


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv padded with ``kernel_size - 1`` zeros on the left only: frame t never sees t+1.

    Upstream's version also threads a streaming cache; cosytrain re-runs the whole prefix instead,
    which gives the same numbers, so the cache is not implemented.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        if stride != 1:
            raise ConfigurationError(f"CausalConv1d supports stride 1 only, got {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias)
        self.causal_padding = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(F.pad(x, (self.causal_padding, 0), value=0.0))


class Transpose(nn.Module):
    """Swap two dims; a parameter-free slot that keeps upstream's Sequential indices (``block.2``)."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


class CausalBlock1D(nn.Module):
    """Causal conv(k=3) -> LayerNorm over channels -> Mish (keys ``block.0`` conv, ``block.2`` norm).

    GroupNorm would mix future frames into the statistics, hence the per-frame LayerNorm. It is the
    FP32-under-autocast LayerNorm, so CPU and CUDA mixed precision agree.
    """

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),
            Transpose(1, 2),
            FP32LayerNorm(dim_out),
            Transpose(1, 2),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(ResnetBlock1D):
    """``ResnetBlock1D`` built from ``CausalBlock1D`` (no GroupNorm, so ``groups`` is unused)."""

    def make_block(self, dim: int, dim_out: int, groups: int) -> nn.Module:
        return CausalBlock1D(dim, dim_out)
