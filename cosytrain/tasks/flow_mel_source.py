"""Mels for vocoder training made by a trained, frozen flow (``HiFTTask(mel_source='flow')``).

With ``mel_source='flow'`` the vocoder trains on mels a trained, frozen flow generates from the
batch's speech tokens (``flow_dir``: a model directory). The flow mel of each utterance is resized to its ground-truth length; that only makes
sense when the audio is not cropped, so the flow path refuses utterances whose flow length differs
by more than 10 % (set the data's ``truncate_length`` to at least the longest utterance).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.modeldir import load_model_dir
from cosytrain.tasks.callbacks import synthesize_mel

__all__ = ["FlowMelSource"]


class FlowMelSource:
    """Mels a frozen flow makes from the batch's speech tokens, resized to the ground-truth frame count.

    Kept outside the module tree on purpose: the flow is not trained, not saved in the checkpoint and
    not exported. ``synthesize(flow, one_utterance_batch, device) -> (80, T')`` defaults to
    upstream's prompt-free ``flow.inference`` call (``cosytrain.tasks.callbacks.synthesize_mel``).
    """

    def __init__(self, flow: nn.Module, synthesize: Optional[Callable[..., Optional[torch.Tensor]]] = None,
                 max_length_ratio_error: float = 0.1) -> None:
        self.flow = flow.eval().requires_grad_(False)
        self.synthesize = synthesize or synthesize_mel
        self.max_error = max_length_ratio_error

    def to(self, device: torch.device) -> "FlowMelSource":
        self.flow.to(device)
        return self

    @staticmethod
    def from_model_dir(model_dir: str) -> "FlowMelSource":
        _, parts = load_model_dir(model_dir, parts=["flow"], device="cpu")
        return FlowMelSource(parts["flow"])

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        feat = batch["speech_feat"]
        lens = batch.get("speech_feat_len")
        out = torch.zeros(feat.shape, dtype=torch.float32, device=device)
        for i in range(feat.shape[0]):
            length = int(lens[i]) if lens is not None else feat.shape[1]
            one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == feat.shape[0] else v)
                   for k, v in batch.items()}
            with torch.autocast(device_type=device.type, enabled=False):
                mel = self.synthesize(self.flow, one, device)
            if mel is None:
                raise ConfigurationError("mel_source=flow: the flow has no upstream-style inference() or the batch"
                                         " lacks speech_token/embedding")
            mel = mel.float()
            made = mel.shape[-1]
            if abs(made - length) > self.max_error * max(length, 1):
                utt = batch.get("utts", [None] * feat.shape[0])[i]
                raise ConfigurationError(f"mel_source=flow: the flow made {made} frames for utterance {utt} but its"
                                         f" audio has {length}; the flow path needs uncropped audio: set"
                                         " data.init_args.truncate_length to at least the longest utterance's samples")
            if made != length:
                mel = F.interpolate(mel[None], size=length, mode="linear", align_corners=False)[0]
            out[i, :length] = mel.t()
        return out
