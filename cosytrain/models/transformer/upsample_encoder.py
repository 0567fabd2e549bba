"""CosyVoice 2's flow encoder (upstream ``cosyvoice.transformer.upsample_encoder``).

Tokens (25 Hz) go through a look-ahead conv, a Conformer stack, a x2 nearest-neighbour upsampling
conv to the 50 Hz mel rate, a second input layer and 4 more Conformer blocks. With
``streaming=True`` both stacks use chunk masks (``static_chunk_size`` tokens, twice that after
upsampling), so the output for a chunk depends only on that chunk, earlier ones and the
``pre_lookahead_len`` look-ahead tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import nn

from cosytrain.models.flow.pre_lookahead import PreLookaheadLayer

from .convolution import ConvolutionModule
from .encoder_layer import ConformerEncoderLayer
from .mask import add_optional_chunk_mask, make_pad_mask
from .positionwise_feed_forward import PositionwiseFeedForward
from .precision import LayerNorm
from .registry import (
    COSYVOICE_ACTIVATION_CLASSES,
    COSYVOICE_ATTENTION_CLASSES,
    COSYVOICE_EMB_CLASSES,
    COSYVOICE_SUBSAMPLE_CLASSES,
    lookup,
)

from cosytrain.errors import ConfigurationError

# Upstream builds PreLookaheadLayer(512, 512, 3) and Upsample1D(512, 512, 2) whatever output_size is.
UPSTREAM_WIDTH = 512
UPSTREAM_LOOKAHEAD = 3
UPSTREAM_UP_BLOCKS = 4


class Upsample1D(nn.Module):
    """Nearest-neighbour x``stride`` then a causal conv (kernel ``2*stride+1``, left pad ``2*stride``)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1, stride=1, padding=0)

    def forward(self, inputs: torch.Tensor, input_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, C, T) -> (B, C_out, stride*T) and the scaled lengths."""
        outputs = F.interpolate(inputs, scale_factor=float(self.stride), mode="nearest")
        outputs = F.pad(outputs, (self.stride * 2, 0), value=0.0)
        return self.conv(outputs), input_lengths * self.stride


class UpsampleConformerEncoder(nn.Module):
    """Look-ahead + Conformer at the token rate, x2 upsampling, Conformer at the mel rate.

    Submodule order and names are upstream's (``embed``, ``after_norm``, ``pre_lookahead_layer``,
    ``encoders``, ``up_layer``, ``up_embed``, ``up_encoders``). Dynamic chunk training is not used by
    upstream's forward (it only switches between full context and ``static_chunk_size``), so
    ``use_dynamic_chunk``/``use_dynamic_left_chunk`` are accepted and stored but have no effect.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: Optional[nn.Module] = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if output_size != UPSTREAM_WIDTH:
            raise ConfigurationError(f"UpsampleConformerEncoder output_size must be {UPSTREAM_WIDTH}: upstream"
                                     " hard-codes its look-ahead and upsampling layers to that width"
                                     f" (got {output_size})")
        self._output_size = output_size
        self.global_cmvn = global_cmvn
        pos_enc = lookup(COSYVOICE_EMB_CLASSES, pos_enc_layer_type, "pos_enc_layer_type")
        subsample = lookup(COSYVOICE_SUBSAMPLE_CLASSES, input_layer, "input_layer")
        self.embed = subsample(input_size, output_size, dropout_rate, pos_enc(output_size, positional_dropout_rate))
        self.normalize_before = normalize_before
        self.after_norm = LayerNorm(output_size, eps=1e-5)
        self.static_chunk_size = static_chunk_size
        self.use_dynamic_chunk = use_dynamic_chunk
        self.use_dynamic_left_chunk = use_dynamic_left_chunk
        self.gradient_checkpointing = gradient_checkpointing

        activation = lookup(COSYVOICE_ACTIVATION_CLASSES, activation_type, "activation_type")()
        attention_cls = lookup(COSYVOICE_ATTENTION_CLASSES, selfattention_layer_type, "selfattention_layer_type")
        attn_args = (attention_heads, output_size, attention_dropout_rate, key_bias)
        ffn_args = (output_size, linear_units, dropout_rate, activation)
        conv_args = (output_size, cnn_module_kernel, activation, cnn_module_norm, causal)

        def conformer_layer() -> ConformerEncoderLayer:
            return ConformerEncoderLayer(
                output_size,
                attention_cls(*attn_args),
                PositionwiseFeedForward(*ffn_args),
                PositionwiseFeedForward(*ffn_args) if macaron_style else None,
                ConvolutionModule(*conv_args) if use_cnn_module else None,
                dropout_rate,
                normalize_before,
            )

        self.pre_lookahead_layer = PreLookaheadLayer(UPSTREAM_WIDTH, UPSTREAM_WIDTH, UPSTREAM_LOOKAHEAD)
        self.encoders = nn.ModuleList([conformer_layer() for _ in range(num_blocks)])
        self.up_layer = Upsample1D(UPSTREAM_WIDTH, UPSTREAM_WIDTH, stride=2)
        self.up_embed = subsample(input_size, output_size, dropout_rate, pos_enc(output_size, positional_dropout_rate))
        self.up_encoders = nn.ModuleList([conformer_layer() for _ in range(UPSTREAM_UP_BLOCKS)])

    def output_size(self) -> int:
        return self._output_size

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        decoding_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
        streaming: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode xs (B, T, D) with lengths xs_lens; returns (B, 2T, D) and the (B, 1, 2T) valid mask.

        ``context`` (B, pre_lookahead_len, D) holds the embedded look-ahead tokens that follow xs
        (streaming inference, eval only). ``decoding_chunk_size`` and ``num_decoding_left_chunks``
        are accepted for signature compatibility and ignored, as upstream.
        """
        del decoding_chunk_size, num_decoding_left_chunks
        masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, pos_emb, masks = self.embed(xs, masks)
        if context is not None and context.size(1) != 0:
            if self.training:
                raise RuntimeError("UpsampleConformerEncoder: context is for streaming inference; call eval() first")
            context_masks = torch.ones(1, 1, context.size(1), dtype=torch.bool, device=context.device)
            context, _, _ = self.embed(context, context_masks, offset=xs.size(1))
        else:
            context = None
        mask_pad = masks
        chunk = self.static_chunk_size if streaming else 0
        chunk_masks = add_optional_chunk_mask(xs, masks, False, False, 0, chunk, -1)
        xs = self.pre_lookahead_layer(xs, context=context)
        xs = self._run(self.encoders, xs, chunk_masks, pos_emb, mask_pad)

        xs, xs_lens = self.up_layer(xs.transpose(1, 2).contiguous(), xs_lens)
        xs = xs.transpose(1, 2).contiguous()
        masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
        xs, pos_emb, masks = self.up_embed(xs, masks)
        mask_pad = masks
        chunk = self.static_chunk_size * self.up_layer.stride if streaming else 0
        chunk_masks = add_optional_chunk_mask(xs, masks, False, False, 0, chunk, -1)
        xs = self._run(self.up_encoders, xs, chunk_masks, pos_emb, mask_pad)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, masks

    def _run(self, layers: nn.ModuleList, xs: torch.Tensor, chunk_masks: torch.Tensor, pos_emb: torch.Tensor,
             mask_pad: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if self.gradient_checkpointing and self.training:
                xs, chunk_masks, _, _ = ckpt.checkpoint(layer.__call__, xs, chunk_masks, pos_emb, mask_pad,
                                                        use_reentrant=False)
            else:
                xs, chunk_masks, _, _ = layer(xs, chunk_masks, pos_emb, mask_pad)
        return xs


__all__ = ["PreLookaheadLayer", "Upsample1D", "UpsampleConformerEncoder"]
