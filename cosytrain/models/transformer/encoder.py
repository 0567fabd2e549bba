"""ESPnet-style Transformer and Conformer encoders with upstream CosyVoice's signatures.

Constructor arguments, defaults and submodule names match ``cosyvoice/transformer/encoder.py``
so upstream yaml sections build the same modules and load the same state dicts.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.utils.checkpoint as ckpt

from .convolution import ConvolutionModule
from .encoder_layer import ConformerEncoderLayer, TransformerEncoderLayer
from .mask import add_optional_chunk_mask, make_pad_mask
from .precision import LayerNorm, match_dtype
from .positionwise_feed_forward import PositionwiseFeedForward
from .registry import (
    COSYVOICE_ACTIVATION_CLASSES,
    COSYVOICE_ATTENTION_CLASSES,
    COSYVOICE_EMB_CLASSES,
    COSYVOICE_SUBSAMPLE_CLASSES,
    lookup,
)

from cosytrain.errors import ConfigurationError


class BaseEncoder(torch.nn.Module):
    """Input layer + positional encoding + a stack of ``encoders`` + ``after_norm``.

    ``static_chunk_size > 0`` makes every forward chunk-causal (``1`` = fully causal, as the
    v1 LLM uses); ``use_dynamic_chunk`` draws a random chunk size per training batch.
    """

    encoders: torch.nn.ModuleList

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
        pos_enc_layer_type: str = "abs_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: Optional[torch.nn.Module] = None,
        use_dynamic_left_chunk: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
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

    def output_size(self) -> int:
        return self._output_size

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        decoding_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch xs (B, T, D) with lengths xs_lens (B,).

        Returns the output (B, T', output_size) and the valid-frame mask (B, 1, T').
        """
        masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, pos_emb, masks = self.embed(xs, masks)
        mask_pad = masks
        chunk_masks = add_optional_chunk_mask(
            xs, masks, self.use_dynamic_chunk, self.use_dynamic_left_chunk,
            decoding_chunk_size, self.static_chunk_size, num_decoding_left_chunks,
        )
        if self.gradient_checkpointing and self.training:
            xs = self.forward_layers_checkpointed(xs, chunk_masks, pos_emb, mask_pad)
        else:
            xs = self.forward_layers(xs, chunk_masks, pos_emb, mask_pad)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, masks

    def forward_layers(
        self, xs: torch.Tensor, chunk_masks: torch.Tensor, pos_emb: torch.Tensor, mask_pad: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.encoders:
            xs, chunk_masks, _, _ = layer(xs, chunk_masks, pos_emb, mask_pad)
        return xs

    def forward_layers_checkpointed(
        self, xs: torch.Tensor, chunk_masks: torch.Tensor, pos_emb: torch.Tensor, mask_pad: torch.Tensor
    ) -> torch.Tensor:
        """Recompute each layer in backward instead of storing its activations."""
        for layer in self.encoders:
            xs, chunk_masks, _, _ = ckpt.checkpoint(
                layer.__call__, xs, chunk_masks, pos_emb, mask_pad, use_reentrant=False
            )
        return xs

    def forward_chunk(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor = torch.zeros(0, 0, 0, 0),
        cnn_cache: torch.Tensor = torch.zeros(0, 0, 0, 0),
        att_mask: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode one chunk (batch 1) given the caches of everything before it.

        att_cache is (layers, head, cache_t, 2 * d_k) and cnn_cache (layers, 1, D, lorder);
        ``required_cache_size < 0`` keeps the whole history. ``att_mask`` (1, chunk,
        chunk) applies to the chunk's own frames (upstream's LLM passes a lower-triangular
        one sized to the chunk). Returns (output, new att_cache, new cnn_cache).
        """
        if xs.size(0) != 1:
            raise ValueError(f"forward_chunk takes batch 1, got {xs.size(0)}; decode one utterance at a time")
        tmp_masks = torch.ones(1, 1, xs.size(1), device=xs.device, dtype=torch.bool)
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, pos_emb, _ = self.embed(xs, tmp_masks, offset)
        elayers, cache_t1 = att_cache.size(0), att_cache.size(2)
        attention_key_size = cache_t1 + xs.size(1)
        pos_emb = match_dtype(self.embed.position_encoding(offset=offset - cache_t1, size=attention_key_size), xs)
        if required_cache_size < 0:
            next_cache_start = 0
        elif required_cache_size == 0:
            next_cache_start = attention_key_size
        else:
            next_cache_start = max(attention_key_size - required_cache_size, 0)
        r_att_cache: List[torch.Tensor] = []
        r_cnn_cache: List[torch.Tensor] = []
        for i, layer in enumerate(self.encoders):
            xs, _, new_att_cache, new_cnn_cache = layer(
                xs,
                att_mask,
                pos_emb,
                att_cache=att_cache[i:i + 1] if elayers > 0 else att_cache,
                cnn_cache=cnn_cache[i] if cnn_cache.size(0) > 0 else cnn_cache,
            )
            r_att_cache.append(new_att_cache[:, :, next_cache_start:, :])
            r_cnn_cache.append(new_cnn_cache.unsqueeze(0))
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, torch.cat(r_att_cache, dim=0), torch.cat(r_cnn_cache, dim=0)

    def forward_chunk_by_chunk(
        self, xs: torch.Tensor, decoding_chunk_size: int, num_decoding_left_chunks: int = -1
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Streaming-style encode of xs (1, T, D), ``decoding_chunk_size`` frames at a time."""
        if decoding_chunk_size <= 0:
            raise ConfigurationError("decoding_chunk_size must be > 0 for chunk-by-chunk decoding")
        if not (self.static_chunk_size > 0 or self.use_dynamic_chunk):
            raise ConfigurationError("chunk-by-chunk decoding needs an encoder trained with static or dynamic chunks")
        subsampling = self.embed.subsampling_rate
        context = self.embed.right_context + 1
        stride = subsampling * decoding_chunk_size
        decoding_window = (decoding_chunk_size - 1) * subsampling + context
        num_frames = xs.size(1)
        att_cache = torch.zeros((0, 0, 0, 0), device=xs.device)
        cnn_cache = torch.zeros((0, 0, 0, 0), device=xs.device)
        outputs = []
        offset = 0
        required_cache_size = decoding_chunk_size * num_decoding_left_chunks
        for cur in range(0, num_frames - context + 1, stride):
            end = min(cur + decoding_window, num_frames)
            y, att_cache, cnn_cache = self.forward_chunk(
                xs[:, cur:end, :], offset, required_cache_size, att_cache, cnn_cache
            )
            outputs.append(y)
            offset += y.size(1)
        ys = torch.cat(outputs, 1)
        return ys, torch.ones((1, 1, ys.size(1)), device=ys.device, dtype=torch.bool)


class TransformerEncoder(BaseEncoder):
    """Stack of :class:`TransformerEncoderLayer` (the v1 LLM backbone)."""

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
        pos_enc_layer_type: str = "abs_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: Optional[torch.nn.Module] = None,
        use_dynamic_left_chunk: bool = False,
        key_bias: bool = True,
        selfattention_layer_type: str = "selfattn",
        activation_type: str = "relu",
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            input_size, output_size, attention_heads, linear_units, num_blocks, dropout_rate,
            positional_dropout_rate, attention_dropout_rate, input_layer, pos_enc_layer_type,
            normalize_before, static_chunk_size, use_dynamic_chunk, global_cmvn,
            use_dynamic_left_chunk, gradient_checkpointing,
        )
        activation_cls = lookup(COSYVOICE_ACTIVATION_CLASSES, activation_type, "activation_type")
        attention_cls = lookup(COSYVOICE_ATTENTION_CLASSES, selfattention_layer_type, "selfattention_layer_type")
        activation = activation_cls()  # one instance shared by all layers, as upstream (stateless)
        self.encoders = torch.nn.ModuleList([
            TransformerEncoderLayer(
                output_size,
                attention_cls(attention_heads, output_size, attention_dropout_rate, key_bias),
                PositionwiseFeedForward(output_size, linear_units, dropout_rate, activation),
                dropout_rate,
                normalize_before,
            )
            for _ in range(num_blocks)
        ])


class ConformerEncoder(BaseEncoder):
    """Stack of :class:`ConformerEncoderLayer` (v1 text encoder, v1 flow encoder)."""

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
        global_cmvn: Optional[torch.nn.Module] = None,
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
        super().__init__(
            input_size, output_size, attention_heads, linear_units, num_blocks, dropout_rate,
            positional_dropout_rate, attention_dropout_rate, input_layer, pos_enc_layer_type,
            normalize_before, static_chunk_size, use_dynamic_chunk, global_cmvn,
            use_dynamic_left_chunk, gradient_checkpointing,
        )
        activation_cls = lookup(COSYVOICE_ACTIVATION_CLASSES, activation_type, "activation_type")
        attention_cls = lookup(COSYVOICE_ATTENTION_CLASSES, selfattention_layer_type, "selfattention_layer_type")
        activation = activation_cls()
        attn_args = (attention_heads, output_size, attention_dropout_rate, key_bias)
        ffn_args = (output_size, linear_units, dropout_rate, activation)
        conv_args = (output_size, cnn_module_kernel, activation, cnn_module_norm, causal)
        self.encoders = torch.nn.ModuleList([
            ConformerEncoderLayer(
                output_size,
                attention_cls(*attn_args),
                PositionwiseFeedForward(*ffn_args),
                PositionwiseFeedForward(*ffn_args) if macaron_style else None,
                ConvolutionModule(*conv_args) if use_cnn_module else None,
                dropout_rate,
                normalize_before,
            )
            for _ in range(num_blocks)
        ])
