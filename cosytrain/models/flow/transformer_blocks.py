"""The transformer blocks of the flow-matching U-Net estimator, with diffusers' parameter names.

These re-implement the pieces of diffusers that CosyVoice's ``ConditionalDecoder`` uses:
``BasicTransformerBlock`` as Matcha subclasses it, ``Attention`` with the SDPA processor,
``FeedForward`` and its activations. Attribute names are chosen so that ``state_dict()`` keys equal
upstream's (``attn1.to_q``, ``to_out.0``, ``ff.net.0.proj``, ``norm1`` ...), which is what lets
upstream checkpoints load with ``strict=True``.

Mixed precision: the attention bias (see :func:`cosytrain.models.flow.blocks.mask_to_bias`) is only
cast to the attention dtype at the last moment (:func:`~cosytrain.models.flow.blocks.bias_for`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.flow.blocks import bias_for

__all__ = ["Attention", "GELU", "GEGLU", "ApproximateGELU", "SnakeBeta", "FeedForward", "BasicTransformerBlock"]


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
