"""A vocoder that needs no training: CosyVoice log-mel -> linear magnitude -> Griffin-Lim phase (torchaudio).

It stands in for ``hift`` when a run has no trained vocoder, so every recipe can be listened to and
measured during training. It has the call surface the inference classes use (``inference(speech_feat,
cache_source=..., finalize=...) -> (speech, source)``, ``sampling_rate``, ``upsample_scale``), so
:class:`cosytrain.inference.model.CosyVoiceModel` and its v2/v3 subclasses run it unchanged.

CosyVoice's mel (:func:`cosytrain.data.features.mel_spectrogram`) is ``log(max(fb @ |STFT|, 1e-5))``
with librosa's Slaney filterbank and a magnitude (not power) spectrum. The inverse here is
``exp``, then :class:`torchaudio.transforms.InverseMelScale` (least squares against the same Slaney
filterbank, negatives clipped) and :class:`torchaudio.transforms.GriffinLim` (``power=1``, magnitude).
Bins above ``fmax`` get no energy (the mel never saw them), so the result sounds band-limited and
phasey: it is an audible, measurable floor, not a substitute for a trained HiFT.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["GriffinLimVocoder"]


class GriffinLimVocoder(nn.Module):
    """Mel (B, n_mels, T) -> waveform (B, T * hop); see the module docstring."""

    def __init__(self, sampling_rate: int = 22050, n_fft: int = 1024, hop_size: int = 256, win_size: int = 1024,
                 num_mels: int = 80, fmin: float = 0.0, fmax: Optional[float] = 8000.0, n_iter: int = 32,
                 momentum: float = 0.99) -> None:
        super().__init__()
        import torchaudio.transforms as T

        self.sampling_rate = int(sampling_rate)
        self.upsample_scale = int(hop_size)  # samples per mel frame, the name HiFT uses
        self.n_fft, self.hop_size, self.win_size = int(n_fft), int(hop_size), int(win_size)
        self.inverse_mel = T.InverseMelScale(n_stft=n_fft // 2 + 1, n_mels=num_mels, sample_rate=sampling_rate,
                                             f_min=fmin, f_max=fmax if fmax is not None else sampling_rate / 2,
                                             norm="slaney", mel_scale="slaney")
        self.griffin_lim = T.GriffinLim(n_fft=n_fft, n_iter=n_iter, win_length=win_size, hop_length=hop_size,
                                        power=1.0, momentum=momentum)

    @classmethod
    def from_feat_config(cls, feat: Any, **kwargs: Any) -> "GriffinLimVocoder":
        """From a ``FeatureConfig`` or a mapping with the ``feat_extractor`` keys."""
        get = (lambda k, d=None: feat.get(k, d)) if isinstance(feat, dict) else (lambda k, d=None: getattr(feat, k, d))
        return cls(sampling_rate=int(get("sample_rate", get("sampling_rate", 22050))), n_fft=int(get("n_fft", 1024)),
                   hop_size=int(get("hop_size", 256)), win_size=int(get("win_size", 1024)),
                   num_mels=int(get("num_mels", 80)), fmin=float(get("fmin", 0.0) or 0.0), fmax=get("fmax", 8000.0),
                   **kwargs)

    @torch.no_grad()
    def inference(self, speech_feat: torch.Tensor, cache_source: Optional[torch.Tensor] = None,
                  finalize: bool = True, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(speech (B, T * hop), source (B, 1, 0))``; there is no excitation source to cache."""
        mel = speech_feat.detach().float().cpu()
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        frames = mel.shape[-1]
        magnitude = self.inverse_mel(mel.exp())
        wav = self.griffin_lim(magnitude)
        wav = wav[..., :frames * self.hop_size]
        if wav.shape[-1] < frames * self.hop_size:
            wav = torch.nn.functional.pad(wav, (0, frames * self.hop_size - wav.shape[-1]))
        peak = wav.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
        wav = torch.where(peak > 0.99, wav / peak * 0.99, wav)  # as HiFT's audio_limit
        device = speech_feat.device
        return wav.to(device), torch.zeros(wav.shape[0], 1, 0, device=device)

    def forward(self, speech_feat: torch.Tensor) -> torch.Tensor:
        return self.inference(speech_feat)[0]
