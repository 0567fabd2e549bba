"""Multi-head self-attention (plain and relative-position), as in upstream CosyVoice/ESPnet.

Parameter names (``linear_q/k/v/out``, ``linear_pos``, ``pos_bias_u/v``) are upstream's, so
state dicts load unchanged. Scores, the ``-inf`` fill and the softmax always run in float32:
under FP16 autocast the score matmuls come out in half precision, and a half softmax over
long rows loses the small probabilities; in FP32 the casts are no-ops, so numbers match
upstream exactly.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from cosytrain.errors import ConfigurationError


def _fake_mask() -> torch.Tensor:
    return torch.ones((0, 0, 0), dtype=torch.bool)


def _fake_cache() -> torch.Tensor:
    return torch.zeros((0, 0, 0, 0))


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention with an optional key/value cache for incremental decoding.

    The cache layout is upstream's: ``(1, head, cache_t, d_k * 2)`` with keys then values
    on the last axis.
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, key_bias: bool = True):
        super().__init__()
        if n_feat % n_head != 0:
            raise ConfigurationError(f"attention width {n_feat} is not divisible by {n_head} heads; change"
                                     f" attention_heads")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split heads: each output is (batch, head, time, d_k)."""
        n_batch = query.size(0)
        q = self.linear_q(query).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def forward_attention(
        self, value: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor = _fake_mask()
    ) -> torch.Tensor:
        """Masked softmax over ``scores`` (batch, head, t1, t2), then weight ``value``.

        ``mask`` is (batch, 1, t2) or (batch, t1, t2), True = attend; a (0, 0, 0) mask means
        no masking. Masked scores are filled with ``-inf`` and their probabilities reset to 0
        after the softmax, exactly as upstream (fully masked rows therefore give zeros).
        """
        n_batch = value.size(0)
        scores = scores.float()
        if mask.size(2) > 0:
            blocked = mask.unsqueeze(1).eq(0)[:, :, :, : scores.size(-1)]
            scores = scores.masked_fill(blocked, -float("inf"))
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        attn = attn.to(value.dtype)
        x = torch.matmul(self.dropout(attn), value)
        x = x.transpose(1, 2).contiguous().view(n_batch, -1, self.h * self.d_k)
        return self.linear_out(x)

    @staticmethod
    def _extend_with_cache(
        k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cache.size(0) > 0:
            key_cache, value_cache = torch.split(cache, cache.size(-1) // 2, dim=-1)
            k = torch.cat([key_cache.to(k.dtype), k], dim=2)
            v = torch.cat([value_cache.to(v.dtype), v], dim=2)
        return k, v, torch.cat((k, v), dim=-1)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor = _fake_mask(),
        pos_emb: torch.Tensor = torch.empty(0),
        cache: torch.Tensor = _fake_cache(),
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (output (batch, t1, d_model), new cache (1, head, cache_t + t1, 2 * d_k))."""
        q, k, v = self.forward_qkv(query, key, value)
        k, v, new_cache = self._extend_with_cache(k, v, cache)
        scores = torch.matmul(q, k.transpose(-2, -1)).float() / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask), new_cache


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL style attention with relative positions (ESPnet ``rel_selfattn``).

    Works with both ``rel_pos`` (T positions) and ``rel_pos_espnet`` (2T-1 positions, then
    the relative shift) encodings, as upstream.
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, key_bias: bool = True):
        super().__init__(n_head, n_feat, dropout_rate, key_bias)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """Turn scores against 2*T2-1 relative positions into (t1, T2) absolute-key scores."""
        zero_pad = torch.zeros((*x.size()[:3], 1), device=x.device, dtype=x.dtype)
        padded = torch.cat([zero_pad, x], dim=-1)
        padded = padded.view(*x.size()[:2], x.size(3) + 1, x.size(2))
        return padded[:, :, 1:].view_as(x)[:, :, :, : x.size(-1) // 2 + 1]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor = _fake_mask(),
        pos_emb: torch.Tensor = torch.empty(0),
        cache: torch.Tensor = _fake_cache(),
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`MultiHeadedAttention.forward`, with ``pos_emb`` (1, P, d_model)."""
        q, k, v = self.forward_qkv(query, key, value)
        q = q.transpose(1, 2)  # (batch, t1, head, d_k)
        k, v, new_cache = self._extend_with_cache(k, v, cache)

        n_batch_pos = pos_emb.size(0)
        p = self.linear_pos(pos_emb).view(n_batch_pos, -1, self.h, self.d_k).transpose(1, 2)
        q_with_bias_u = (q + self.pos_bias_u).transpose(1, 2)
        q_with_bias_v = (q + self.pos_bias_v).transpose(1, 2)

        matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))
        matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
        if matrix_ac.shape != matrix_bd.shape:
            matrix_bd = self.rel_shift(matrix_bd)
        # The sum is taken in float32 so half-precision score terms do not cancel badly.
        scores = (matrix_ac.float() + matrix_bd.float()) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask), new_cache
