"""Building blocks of the flow-matching U-Net estimator.

These re-implement Matcha-TTS's ``matcha/models/components/decoder.py`` blocks and the pieces of
diffusers (``BasicTransformerBlock`` as Matcha subclasses it, ``Attention`` with the SDPA processor,
``FeedForward`` and its activations) that CosyVoice's ``ConditionalDecoder`` uses. Attribute names
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


# ----------------------------------------------------------------------------------------------
# diffusers-compatible attention / feed-forward
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with diffusers ``Attention`` parameter names (``to_q``, ``to_out.0``).

    Only the configuration Matcha's ``BasicTransformerBlock`` builds is supported: no group/spatial
    norm, no qk-norm, no residual inside. ``upcast_attention`` is accepted for signature
    compatibility; like diffusers' SDPA processor it has no effect. ``attention_mask`` is an additive bias of shape
    (B, T_q, T_k) or (B, heads, T_q, T_k), preferably FP32 (see ``mask_to_bias``).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        out_bias: bool = True,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return x.view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Scaled dot-product attention over (B, H, T, D); override for caches or other kernels."""
        if bias is not None:
            if bias.dim() == 3:
                bias = bias.unsqueeze(1)
            bias = bias_for(bias, query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        query = self.split_heads(self.to_q(hidden_states))
        key = self.split_heads(self.to_k(context))
        value = self.split_heads(self.to_v(context))
        out = self.attend(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * query.shape[-1]).to(query.dtype)
        out = self.to_out[0](out)
        return self.to_out[1](out)


class GELU(nn.Module):
    """Linear projection followed by GELU (diffusers ``GELU``; key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU (diffusers ``GEGLU``): proj to 2*dim_out, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """Sigmoid approximation of GELU (diffusers ``ApproximateGELU``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class SnakeBeta(nn.Module):
    """Matcha's SnakeBeta: proj then x + 1/beta * sin^2(alpha * x), log-scale alpha/beta."""

    def __init__(self, in_features: int, out_features: int, alpha: float = 1.0,
                 alpha_trainable: bool = True, alpha_logscale: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)
        self.alpha_logscale = alpha_logscale
        init = torch.zeros(out_features) if alpha_logscale else torch.ones(out_features)
        self.alpha = nn.Parameter(init * alpha, requires_grad=alpha_trainable)
        self.beta = nn.Parameter(init.clone() * alpha, requires_grad=alpha_trainable)
        self.no_div_by_zero = 1e-9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        alpha = torch.exp(self.alpha) if self.alpha_logscale else self.alpha
        beta = torch.exp(self.beta) if self.alpha_logscale else self.beta
        return x + (1.0 / (beta + self.no_div_by_zero)) * torch.pow(torch.sin(x * alpha), 2)


def _ff_activation(name: str, dim: int, inner_dim: int) -> nn.Module:
    if name == "gelu":
        return GELU(dim, inner_dim)
    if name == "gelu-approximate":
        return GELU(dim, inner_dim, approximate="tanh")
    if name == "geglu":
        return GEGLU(dim, inner_dim)
    if name == "geglu-approximate":
        return ApproximateGELU(dim, inner_dim)
    if name == "snakebeta":
        return SnakeBeta(dim, inner_dim)
    # upstream's ConditionalDecoder default 'snake' is not handled by Matcha's FeedForward either
    raise ConfigurationError(
        f"unknown feed-forward activation {name!r}; use gelu, gelu-approximate, geglu, geglu-approximate "
        "or snakebeta (upstream configs use act_fn: 'gelu')"
    )


class FeedForward(nn.Module):
    """``net = [activation-with-proj, Dropout, Linear(, Dropout)]`` as in Matcha/diffusers."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        self.net = nn.ModuleList([_ff_activation(activation_fn, dim, inner_dim), nn.Dropout(dropout),
                                  nn.Linear(inner_dim, dim_out)])
        if final_dropout:
            self.net.append(nn.Dropout(dropout))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (+ optional cross-attention) + feed-forward block.

    Same parameters and key names as Matcha's ``BasicTransformerBlock`` with ``norm_type='layer_norm'``
    (the only kind CosyVoice uses; the ada-norm variants are refused).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: Optional[int] = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: Optional[int] = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_type: str = "layer_norm",
        final_dropout: bool = False,
    ):
        super().__init__()
        if norm_type != "layer_norm" or num_embeds_ada_norm is not None:
            raise ConfigurationError(f"BasicTransformerBlock supports norm_type='layer_norm' only, got {norm_type!r}")
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)
        self.attn1 = self.make_self_attention(dim, num_attention_heads, attention_head_dim, dropout, attention_bias,
                                              cross_attention_dim if only_cross_attention else None,
                                              upcast_attention)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim if not double_self_attention else None,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                dropout=dropout,
                bias=attention_bias,
                upcast_attention=upcast_attention,
            )
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout)

    @staticmethod
    def make_self_attention(dim: int, heads: int, dim_head: int, dropout: float, bias: bool,
                            cross_attention_dim: Optional[int], upcast_attention: bool) -> Attention:
        """Factory hook so causal/cached variants can swap the attention class."""
        return Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                         dropout=dropout, bias=bias, upcast_attention=upcast_attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        norm_hidden = self.norm1(hidden_states)
        attn_out = self.attn1(
            norm_hidden,
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=encoder_attention_mask if self.only_cross_attention else attention_mask,
        )
        hidden_states = attn_out + hidden_states
        if self.attn2 is not None:
            norm_hidden = self.norm2(hidden_states)
            hidden_states = self.attn2(norm_hidden, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=encoder_attention_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states
