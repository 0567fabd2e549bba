"""Input layers of the ESPnet-style encoders (``input_layer`` in upstream configs).

Submodule names (``out``, ``conv``, ``linear``, ``embed``) and their Sequential indices are
upstream's, because they are part of the state-dict keys (e.g. ``embed.out.0.weight``).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .precision import LayerNorm

Offset = Union[int, torch.Tensor]
EmbedOut = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BaseSubsampling(torch.nn.Module):
    """Common bits: frame rate change and the right context the layer needs."""

    def __init__(self) -> None:
        super().__init__()
        self.right_context = 0
        self.subsampling_rate = 1
        self.pos_enc: torch.nn.Module

    def position_encoding(self, offset: Offset, size: int) -> torch.Tensor:
        return self.pos_enc.position_encoding(offset, size)


class LinearNoSubsampling(BaseSubsampling):
    """``linear``: Linear -> LayerNorm -> Dropout, then the positional encoding."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.out = torch.nn.Sequential(
            torch.nn.Linear(idim, odim),
            LayerNorm(odim, eps=1e-5),
            torch.nn.Dropout(dropout_rate),
        )
        self.pos_enc = pos_enc_class

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: Offset = 0) -> EmbedOut:
        x, pos_emb = self.pos_enc(self.out(x), offset)
        return x, pos_emb, x_mask


class LegacyLinearNoSubsampling(LinearNoSubsampling):
    """``linear_legacy`` (v1 LLM): as ``linear`` with a trailing ReLU (``out.3``)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__(idim, odim, dropout_rate, pos_enc_class)
        self.out.append(torch.nn.ReLU())


class EmbedinigNoSubsampling(BaseSubsampling):
    """``embed``: token ids -> embedding (upstream's spelling of the class name is kept)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.embed = torch.nn.Embedding(idim, odim)
        self.pos_enc = pos_enc_class

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: Offset = 0) -> EmbedOut:
        x, pos_emb = self.pos_enc(self.embed(x), offset)
        return x, pos_emb, x_mask


EmbeddingNoSubsampling = EmbedinigNoSubsampling


class Conv1dSubsampling2(BaseSubsampling):
    """``conv1d2``: two 1-D convs (the second with stride 2), GELU, Whisper style."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv1d(idim, odim, kernel_size=3, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv1d(odim, odim, kernel_size=3, stride=2, padding=1),
            torch.nn.GELU(),
        )
        self.pos_enc = pos_enc_class
        self.subsampling_rate = 2
        self.right_context = 4

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: Offset = 0) -> EmbedOut:
        time = x.size(1)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x, pos_emb = self.pos_enc(x, offset)
        return x, pos_emb, x_mask[:, :, (time + 1) % 2::2]


class _Conv2dSubsampling(BaseSubsampling):
    """Stack of stride-k 2-D convs over (time, feature), then a Linear to ``odim``."""

    _mask_slices: Tuple[Tuple[int, int], ...] = ()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: Offset = 0) -> EmbedOut:
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.size()
        x = self._project(x.transpose(1, 2).contiguous().view(b, t, c * f))
        x, pos_emb = self.pos_enc(x, offset)
        for start, step in self._mask_slices:
            x_mask = x_mask[:, :, start::step]
        return x, pos_emb, x_mask


class Conv2dSubsampling4(_Conv2dSubsampling):
    """``conv2d``: 1/4 frame rate."""

    _mask_slices = ((2, 2), (2, 2))

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, odim, 3, 2), torch.nn.ReLU(),
            torch.nn.Conv2d(odim, odim, 3, 2), torch.nn.ReLU(),
        )
        self.out = torch.nn.Sequential(torch.nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim))
        self.pos_enc = pos_enc_class
        self.subsampling_rate = 4
        self.right_context = 6

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class Conv2dSubsampling6(_Conv2dSubsampling):
    """``conv2d6``: 1/6 frame rate."""

    _mask_slices = ((2, 2), (4, 3))

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, odim, 3, 2), torch.nn.ReLU(),
            torch.nn.Conv2d(odim, odim, 5, 3), torch.nn.ReLU(),
        )
        self.linear = torch.nn.Linear(odim * (((idim - 1) // 2 - 2) // 3), odim)
        self.pos_enc = pos_enc_class
        self.subsampling_rate = 6
        self.right_context = 10

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Conv2dSubsampling8(_Conv2dSubsampling):
    """``conv2d8``: 1/8 frame rate."""

    _mask_slices = ((2, 2), (2, 2), (2, 2))

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: torch.nn.Module):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, odim, 3, 2), torch.nn.ReLU(),
            torch.nn.Conv2d(odim, odim, 3, 2), torch.nn.ReLU(),
            torch.nn.Conv2d(odim, odim, 3, 2), torch.nn.ReLU(),
        )
        self.linear = torch.nn.Linear(odim * ((((idim - 1) // 2 - 1) // 2 - 1) // 2), odim)
        self.pos_enc = pos_enc_class
        self.subsampling_rate = 8
        self.right_context = 14

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
