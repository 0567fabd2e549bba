"""The U-Net velocity estimator of CosyVoice 1's flow (upstream ``cosyvoice.flow.decoder``).

``ConditionalDecoder`` predicts d(x)/dt from the noisy mel ``x`` concatenated with the encoder
output ``mu``, the speaker vector and the prompt condition, with the sinusoidal time embedding added
in every resnet block. Block construction and the attention-mask building are separate methods so
that the causal (v2) variant can override them without copying the U-Net walk.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.flow.blocks import (
    Block1D,
    CausalBlock1D,
    CausalConv1d,
    CausalResnetBlock1D,
    Downsample1D,
    ResnetBlock1D,
    SinusoidalPosEmb,
    TimestepEmbedding,
    Upsample1D,
    mask_to_bias,
)
from cosytrain.models.flow.transformer_blocks import BasicTransformerBlock
from cosytrain.models.transformer.mask import add_optional_chunk_mask


class ConditionalDecoder(nn.Module):
    """Matcha-style 1-D U-Net: down blocks, mid blocks, up blocks with skip connections."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "snake",
    ):
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ConfigurationError("ConditionalDecoder needs at least one entry in channels, e.g. [256, 256]")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self._block_args = dict(num_heads=num_heads, attention_head_dim=attention_head_dim, dropout=dropout,
                                act_fn=act_fn, n_blocks=n_blocks)

        self.time_embeddings = SinusoidalPosEmb(in_channels)
        time_embed_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels=in_channels, time_embed_dim=time_embed_dim, act_fn="silu")
        self.down_blocks = nn.ModuleList([])
        self.mid_blocks = nn.ModuleList([])
        self.up_blocks = nn.ModuleList([])

        output_channel = in_channels
        for i, ch in enumerate(channels):
            input_channel, output_channel = output_channel, ch
            is_last = i == len(channels) - 1
            self.down_blocks.append(nn.ModuleList([
                self.make_resnet(input_channel, output_channel, time_embed_dim),
                self.make_transformers(output_channel),
                self.make_downsample(output_channel, is_last),
            ]))

        for _ in range(num_mid_blocks):
            self.mid_blocks.append(nn.ModuleList([
                self.make_resnet(channels[-1], output_channel, time_embed_dim),
                self.make_transformers(output_channel),
            ]))

        up_channels = channels[::-1] + (channels[0],)
        for i in range(len(up_channels) - 1):
            input_channel, output_channel = up_channels[i] * 2, up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            self.up_blocks.append(nn.ModuleList([
                self.make_resnet(input_channel, output_channel, time_embed_dim),
                self.make_transformers(output_channel),
                self.make_upsample(output_channel, is_last),
            ]))
        self.final_block = self.make_final_block(up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], self.out_channels, 1)
        self.initialize_weights()

    # -- construction hooks (overridden by causal variants) -------------------------------------
    def make_resnet(self, dim: int, dim_out: int, time_emb_dim: int) -> nn.Module:
        return ResnetBlock1D(dim=dim, dim_out=dim_out, time_emb_dim=time_emb_dim)

    def make_transformer(self, dim: int) -> nn.Module:
        a = self._block_args
        return BasicTransformerBlock(dim=dim, num_attention_heads=a["num_heads"],
                                     attention_head_dim=a["attention_head_dim"], dropout=a["dropout"],
                                     activation_fn=a["act_fn"])

    def make_transformers(self, dim: int) -> nn.ModuleList:
        return nn.ModuleList([self.make_transformer(dim) for _ in range(self._block_args["n_blocks"])])

    def make_downsample(self, dim: int, is_last: bool) -> nn.Module:
        return nn.Conv1d(dim, dim, 3, padding=1) if is_last else Downsample1D(dim)

    def make_upsample(self, dim: int, is_last: bool) -> nn.Module:
        return nn.Conv1d(dim, dim, 3, padding=1) if is_last else Upsample1D(dim, use_conv_transpose=True)

    def make_final_block(self, dim: int) -> nn.Module:
        return Block1D(dim, dim)

    def initialize_weights(self) -> None:
        """Upstream init: Kaiming-normal (relu) convs/linears with zero bias, unit GroupNorm."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    # -- forward pieces ----------------------------------------------------------------------------
    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """FP32 sinusoidal embedding, then the MLP (which autocast may run in FP16)."""
        emb = self.time_embeddings(t)
        # no-op under autocast (FP32 weights); a model cast with .half() needs FP16 input
        return self.time_mlp(emb.to(self.time_mlp.linear_1.weight.dtype))

    def attention_mask(self, x: torch.Tensor, mask: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        """Boolean (B, T, T) mask: every query sees every valid key.

        Upstream uses ``add_optional_chunk_mask(..., 0, 0, -1)`` which also sets rows without any
        valid key to all True (so softmax stays finite). Causal variants override this for chunks.
        """
        valid = mask.bool()
        valid = valid | (valid.sum(dim=-1, keepdim=True) == 0)
        return valid.repeat(1, x.size(1), 1)

    def run_transformers(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor,
                         t: torch.Tensor, streaming: bool) -> torch.Tensor:
        x = x.transpose(1, 2).contiguous()
        bias = mask_to_bias(self.attention_mask(x, mask, streaming))
        for block in blocks:
            x = block(hidden_states=x, attention_mask=bias, timestep=t)
        return x.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                streaming: bool = False) -> torch.Tensor:
        """x, mu, cond: (B, C, T); mask: (B, 1, T); t: (B,); spks: (B, C_spk). Returns (B, out, T)."""
        t = self.embed_time(t)
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)

        hiddens = []
        masks = [mask]
        for resnet, transformers, downsample in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, t)
            x = self.run_transformers(transformers, x, mask_down, t, streaming)
            hiddens.append(x)
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]

        for resnet, transformers in self.mid_blocks:
            x = resnet(x, mask_mid, t)
            x = self.run_transformers(transformers, x, mask_mid, t, streaming)

        for resnet, transformers, upsample in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            # the transposed conv gives an even length; crop to the skip's (possibly odd) length
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = resnet(x, mask_up, t)
            x = self.run_transformers(transformers, x, mask_up, t, streaming)
            x = upsample(x * mask_up)
        x = self.final_block(x, mask_up)
        return self.final_proj(x * mask_up) * mask


class CausalConditionalDecoder(ConditionalDecoder):
    """CosyVoice 2's estimator (upstream ``cosyvoice.flow.decoder.CausalConditionalDecoder``).

    Same U-Net walk and keys as v1, with left-padded convs and per-frame LayerNorm in every block,
    causal convs instead of the last down/up-sampling step, and, with ``streaming=True``, attention
    restricted to chunks of ``static_chunk_size`` frames (each frame sees its own chunk and all
    earlier ones). ``streaming=False`` attends to every valid frame, as v1. The official config uses
    one channel entry, so the non-causal ``Downsample1D``/``Upsample1D`` are never built there.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "snake",
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ):
        super().__init__(in_channels, out_channels, channels=channels, dropout=dropout,
                         attention_head_dim=attention_head_dim, n_blocks=n_blocks, num_mid_blocks=num_mid_blocks,
                         num_heads=num_heads, act_fn=act_fn)
        self.static_chunk_size = static_chunk_size
        # upstream passes this on, but its chunk mask ignores it (every earlier chunk stays visible)
        self.num_decoding_left_chunks = num_decoding_left_chunks

    def make_resnet(self, dim: int, dim_out: int, time_emb_dim: int) -> nn.Module:
        return CausalResnetBlock1D(dim=dim, dim_out=dim_out, time_emb_dim=time_emb_dim)

    def make_downsample(self, dim: int, is_last: bool) -> nn.Module:
        return CausalConv1d(dim, dim, 3) if is_last else Downsample1D(dim)

    def make_upsample(self, dim: int, is_last: bool) -> nn.Module:
        return CausalConv1d(dim, dim, 3) if is_last else Upsample1D(dim, use_conv_transpose=True)

    def make_final_block(self, dim: int) -> nn.Module:
        return CausalBlock1D(dim, dim)

    def attention_mask(self, x: torch.Tensor, mask: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        if not streaming:
            return super().attention_mask(x, mask, streaming)
        if self.static_chunk_size <= 0:
            raise ConfigurationError("streaming needs static_chunk_size > 0 in the decoder config (upstream:"
                                     " chunk_size * 2)")
        return add_optional_chunk_mask(x, mask.bool(), False, False, 0, self.static_chunk_size,
                                       self.num_decoding_left_chunks)
