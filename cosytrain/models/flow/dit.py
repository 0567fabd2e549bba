"""CosyVoice 3's DiT velocity estimator (upstream ``cosyvoice.flow.DiT.dit.DiT`` and ``DiT/modules.py``).

An F5-TTS style diffusion transformer: the noisy mel, prompt condition, token features and speaker
vector are projected to ``dim`` and given a causal grouped-conv position embedding; each block is
adaLN-zero modulated by the flow time, with rotary self-attention. Key names (``time_embed.time_mlp.0``,
``input_embed.conv_pos_embed.conv1.0``, ``transformer_blocks.N.attn_norm.linear``, ``ff.ff.0.0``,
``norm_out.linear``, ``rotary_embed.inv_freq`` ...) are upstream's.

Two upstream quirks are kept because they change the numbers:

* the rotary embedding (x-transformers, interleaved pairs) is applied to the *un-split* q/k, so
  only the first ``dim_head`` channels, i.e. head 0, are rotated; the other heads get no positions;
* attention output rows are zeroed with the **last** query row of the mask (``mask[:, 0, -1]``),
  which is the padding mask for both the full and the chunk mask.

Mixed precision: the time embedding, the rotary phases and rotation, the layer norms and the
residual stream are kept in FP32 under autocast; linears, convs and attention run in half.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.flow.blocks import SinusoidalPosEmb
from cosytrain.models.transformer.mask import add_optional_chunk_mask
from cosytrain.models.transformer.precision import LayerNorm, autocast_active


class RotaryEmbedding(nn.Module):
    """x-transformers ``RotaryEmbedding(dim)`` (no xpos): persistent ``inv_freq`` buffer, interleaved freqs."""

    def __init__(self, dim: int, base: float = 10000.0, interpolation_factor: float = 1.0):
        super().__init__()
        if dim % 2 != 0:
            raise ConfigurationError(f"rotary dim_head must be even, got {dim}")
        self.interpolation_factor = interpolation_factor
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward_from_seq_len(self, seq_len: int) -> torch.Tensor:
        """(1, seq_len, dim) FP32 phases, each frequency repeated for its (even, odd) channel pair."""
        with torch.autocast(device_type=self.inv_freq.device.type, enabled=False):
            inv_freq = self.inv_freq.float()
            t = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
            freqs = torch.einsum("i,j->ij", t, inv_freq) / self.interpolation_factor
            return torch.stack((freqs, freqs), dim=-1).reshape(1, seq_len, -1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): pairs are adjacent channels."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``freqs.shape[-1]`` channels of t (B, T, C) in FP32; the rest pass through."""
    rot_dim, seq_len, dtype = freqs.shape[-1], t.shape[-2], t.dtype
    freqs = freqs[:, -seq_len:, :]
    rot, rest = t[..., :rot_dim].float(), t[..., rot_dim:]
    rot = rot * freqs.cos() + rotate_half(rot) * freqs.sin()
    return torch.cat((rot.to(dtype), rest), dim=-1)


class CausalConvPositionEmbedding(nn.Module):
    """Two left-padded grouped convs with Mish (``conv1.0``, ``conv2.0``); ``dim`` must divide by ``groups``."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigurationError(f"kernel_size must be odd, got {kernel_size}")
        if dim % groups != 0:
            raise ConfigurationError(f"DiT dim must be a multiple of {groups} (grouped conv position embedding), got"
                                     f" {dim}")
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, dim); optional bool mask (B, T) zeroes padding before and after."""
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = x.permute(0, 2, 1)
        x = self.conv1(F.pad(x, (self.kernel_size - 1, 0)))
        x = self.conv2(F.pad(x, (self.kernel_size - 1, 0)))
        out = x.permute(0, 2, 1)
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0.0)
        return out


class InputEmbedding(nn.Module):
    """``proj(cat[x, cond, mu, spks])`` plus its causal conv position embedding."""

    def __init__(self, mel_dim: int, text_dim: int, out_dim: int, spk_dim: Optional[int] = None):
        super().__init__()
        self.spk_dim = 0 if spk_dim is None else spk_dim
        self.proj = nn.Linear(mel_dim * 2 + text_dim + self.spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim=out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text_embed: torch.Tensor,
                spks: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [x, cond, text_embed]
        if self.spk_dim > 0:
            if spks is None:
                raise ConfigurationError("this DiT was built with spk_dim > 0 and needs a speaker embedding (spks)")
            parts.append(spks.unsqueeze(1).expand(-1, x.shape[1], -1))
        x = self.proj(torch.cat(parts, dim=-1))
        return self.conv_pos_embed(x) + x


class TimestepEmbedding(nn.Module):
    """Sinusoidal(256) of the flow time (FP32) -> Linear -> SiLU -> Linear (``time_mlp.0``/``.2``)."""

    def __init__(self, dim: int, freq_embed_dim: int = 256):
        super().__init__()
        self.time_embed = SinusoidalPosEmb(freq_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        hidden = self.time_embed(timestep)
        # no-op under autocast (FP32 weights); a model cast with .half() needs half input
        return self.time_mlp(hidden.to(self.time_mlp[0].weight.dtype))


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the time: returns the attention input and the MLP shift/scale/gates."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(emb, 6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    """Final modulation: ``linear`` gives (scale, shift) in that order."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        emb = self.linear(self.silu(emb))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    """``ff = [Sequential(Linear, GELU(tanh)), Dropout, Linear]``."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: float = 4, dropout: float = 0.0,
                 approximate: str = "none"):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU(approximate=approximate)),
                                nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class Attention(nn.Module):
    """Self-attention with biased q/k/v, rotary on the un-split projections, SDPA with a bool mask."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.inner_dim = dim_head * heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_dim)
        self.to_v = nn.Linear(dim, self.inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, dim); mask bool (B, 1, T, T) or (B, T); rope (1, T, dim_head) phases."""
        b = x.shape[0]
        query, key, value = self.to_q(x), self.to_k(x), self.to_v(x)
        if rope is not None:
            query = apply_rotary_pos_emb(query, rope)
            key = apply_rotary_pos_emb(key, rope)
        head_dim = key.shape[-1] // self.heads
        dtype = value.dtype
        query, key, value = (t.to(dtype).view(b, -1, self.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        attn_mask = mask
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask[:, None, None, :].expand(b, self.heads, query.shape[-2], key.shape[-2])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * head_dim).to(dtype)
        out = self.to_out[1](self.to_out[0](out))
        if mask is not None:
            # upstream zeroes rows with the last query row of the mask (= the padding mask)
            keep = mask.unsqueeze(-1) if mask.dim() == 2 else mask[:, 0, -1].unsqueeze(-1)
            out = out.masked_fill(~keep, 0.0)
        return out


class DiTBlock(nn.Module):
    """adaLN-zero block: gated attention and gated tanh-GELU MLP, both modulated by the time."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float = 4, dropout: float = 0.1):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, mult=ff_mult, dropout=dropout, approximate="tanh")

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, emb=t)
        x = x + gate_msa.unsqueeze(1) * self.attn(norm, mask=mask, rope=rope)
        ff_in = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(ff_in)


class DiT(nn.Module):
    """The estimator called as ``DiT(x, mask, mu, t, spks, cond, streaming)`` with (B, 80, T) tensors.

    ``streaming=True`` uses a chunk-causal attention mask of ``static_chunk_size`` frames;
    ``num_decoding_left_chunks`` is stored but, as upstream, has no effect. The output is not
    multiplied by the mask (upstream does not either; the loss masks it).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_mult: float = 4,
        mel_dim: int = 80,
        mu_dim: Optional[int] = None,
        long_skip_connection: bool = False,
        spk_dim: Optional[int] = None,
        out_channels: Optional[int] = None,
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ):
        super().__init__()
        self.time_embed = TimestepEmbedding(dim)
        mu_dim = mel_dim if mu_dim is None else mu_dim
        self.input_embed = InputEmbedding(mel_dim, mu_dim, dim, spk_dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.dim = dim
        self.depth = depth
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, dropout=dropout) for _ in range(depth)]
        )
        self.long_skip_connection = nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        self.norm_out = AdaLayerNormZeroFinal(dim)
        self.proj_out = nn.Linear(dim, mel_dim)
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks

    def attention_mask(self, x: torch.Tensor, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """Bool (B, 1, T, T): chunk-causal when streaming, else every valid key (empty rows all True)."""
        if streaming:
            if self.static_chunk_size <= 0:
                raise ConfigurationError("streaming needs static_chunk_size > 0 in the DiT config (upstream:"
                                         " chunk_size * 2)")
            return add_optional_chunk_mask(x, mask.bool(), False, False, 0, self.static_chunk_size, -1).unsqueeze(1)
        return add_optional_chunk_mask(x, mask.bool(), False, False, 0, 0, -1).repeat(1, x.size(1), 1).unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                streaming: bool = False) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T); t (B,) or scalar; spks (B, spk_dim). Returns (B, 80, T)."""
        if cond is None:
            raise ValueError("DiT needs cond (the prompt mel, zeros where there is none)")
        x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
        batch, seq_len = x.shape[0], x.shape[1]
        if t.ndim == 0:
            t = t.repeat(batch)
        t = self.time_embed(t)
        x = self.input_embed(x, cond, mu, spks)
        if autocast_active(x):
            # keep the residual stream FP32; each sublayer still computes in half precision
            x = x.float()
        rope = self.rotary_embed.forward_from_seq_len(seq_len)
        residual = x
        attn_mask = self.attention_mask(x, mask, streaming)
        for block in self.transformer_blocks:
            x = block(x, t, mask=attn_mask, rope=rope)
        if self.long_skip_connection is not None:
            x = self.long_skip_connection(torch.cat((x, residual), dim=-1))
        x = self.norm_out(x, t)
        return self.proj_out(x).transpose(1, 2)


# upstream class name
AdaLayerNormZero_Final = AdaLayerNormZeroFinal

__all__ = ["DiT", "DiTBlock", "InputEmbedding", "RotaryEmbedding", "TimestepEmbedding", "apply_rotary_pos_emb"]
