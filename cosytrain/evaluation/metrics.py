"""Distances between an FP32 reference and a reduced-precision run of the same model on the same input.

Pure functions on tensors; every reduction is done in float64 so the metric itself adds no rounding
error of the size it is trying to measure. Definitions (kept stable: tolerances and model cards
refer to them):

* ``top1_agreement``: fraction of valid positions where ``argmax`` of the two logits agree.
* ``kl_divergence``: ``KL(p_ref || p_test)`` in nats of the softmax distributions, per valid position
  (mean and max are reported by the caller). KL is 0 for equal logits and for logits that differ by a
  constant per position (softmax is shift-invariant), which is what precision should preserve.
* ``mel_l1``: mean absolute difference of two (log-)mels over valid frames, in the mel's units
  (natural-log amplitude for CosyVoice mels).
* ``cosine_similarity``: cosine of the angle between the two flattened mels after each has its own
  mean removed (a Pearson correlation). Centring matters: a log-mel is mostly a large negative floor,
  so the raw cosine of two unrelated log-mels is already close to 1.
* ``log_spectral_distance`` (LSD, dB): per STFT frame ``sqrt(mean_f (10 log10 P_ref - 10 log10 P_test)^2)``,
  averaged over frames, with both power spectra floored ``dynamic_range_db`` (default 80) below the
  reference's peak bin. Without a relative floor, bins 60-100 dB below the peak (numerically
  meaningless, inaudible) dominate: FP16 rounding noise is about 60 dB below the signal, so it is
  "large" exactly there. Defaults: 1024-point FFT, hop 256, periodic Hann window.
* ``mel_cepstral_distortion`` (MCD, dB): mel-cepstra are the orthonormal DCT-II of the natural-log
  mel-filterbank *amplitude* (``0.5 * ln(max(power @ fbank, floor))``, 80 HTK-scale bands up to
  Nyquist, ``floor`` ``dynamic_range_db`` below the reference's peak band energy, as for LSD);
  coefficients 1..13 are kept (``c0``, the frame energy, is dropped as usual);
  ``MCD = (10 / ln 10) * sqrt(2 * sum_k (c_k - c'_k)^2)``, averaged over frames. This is the usual
  MCD formula, but on DCT-of-log-mel cepstra rather than SPTK's all-pass-warped mel-cepstra, so the
  numbers are comparable between cosytrain runs, not with MCD values published elsewhere.
* ``count_nonfinite``: number of NaN/inf elements.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "count_nonfinite",
    "top1_agreement",
    "kl_divergence",
    "mel_l1",
    "cosine_similarity",
    "log_spectral_distance",
    "mel_cepstral_distortion",
    "mel_cepstra",
    "mel_energies",
    "power_spectrogram",
    "dct_matrix",
]

_POWER_FLOOR = 1e-10
_DB = 10.0 / math.log(10.0)


def count_nonfinite(x: torch.Tensor) -> int:
    """Number of NaN or +-inf elements (0 for integer tensors)."""
    if not x.is_floating_point():
        return 0
    return int((~torch.isfinite(x)).sum())


def _valid(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits (..., V) -> (N, V) at the positions where ``mask`` is true (all positions without a mask)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat
    mask = mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
    if mask.numel() != flat.shape[0]:
        raise ValueError(f"mask has {mask.numel()} positions but the logits have {flat.shape[0]}")
    return flat[mask]


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ ({list(a.shape)} vs {list(b.shape)}); compare the same utterance")


def top1_agreement(logits_ref: torch.Tensor, logits_test: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> float:
    """Fraction of (masked) positions whose most likely class is the same in both runs; 1.0 if none."""
    _same_shape(logits_ref, logits_test, "top1_agreement")
    ref, test = _valid(logits_ref, mask), _valid(logits_test, mask)
    if ref.shape[0] == 0:
        return 1.0
    return float((ref.argmax(-1) == test.argmax(-1)).double().mean())


def kl_divergence(logits_ref: torch.Tensor, logits_test: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-position ``KL(softmax(ref) || softmax(test))`` in nats, float64, shape (N,) of valid positions.

    Non-finite logits in ``test`` make the KL non-finite (inf/NaN), on purpose: that is a failure.
    """
    _same_shape(logits_ref, logits_test, "kl_divergence")
    ref = _valid(logits_ref, mask).double().log_softmax(-1)
    test = _valid(logits_test, mask).double().log_softmax(-1)
    p = ref.exp()
    # 0 * log 0 = 0 where p underflows; xlogy-style masking keeps -inf in ref from making NaN
    terms = torch.where(p > 0, p * (ref - test), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def _frames_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    return mask.to(device=x.device, dtype=torch.bool).expand_as(x)


def mel_l1(mel_ref: torch.Tensor, mel_test: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Mean absolute difference over the elements where ``mask`` (broadcastable to the mels) is true."""
    _same_shape(mel_ref, mel_test, "mel_l1")
    keep = _frames_mask(mel_ref, mask)
    diff = (mel_ref.double() - mel_test.double()).abs()[keep]
    return float(diff.mean()) if diff.numel() else 0.0


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, center: bool = True) -> float:
    """Cosine similarity of the flattened tensors; ``center`` removes each one's mean first (Pearson).

    Two constant tensors count as identical (1.0) when equal, else 0.0.
    """
    _same_shape(a, b, "cosine_similarity")
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    if center:
        x, y = x - x.mean(), y - y.mean()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 1.0 if torch.equal(x, y) else 0.0
    return float((x @ y) / (nx * ny))


def power_spectrogram(wav: torch.Tensor, n_fft: int = 1024, hop: int = 256) -> torch.Tensor:
    """|STFT|^2 (frames, n_fft // 2 + 1) of a 1-D waveform in float64, periodic Hann, no centering.

    Signals shorter than one window are zero-padded to one frame.
    """
    wav = wav.detach().reshape(-1).double()
    if wav.numel() < n_fft:
        wav = F.pad(wav, (0, n_fft - wav.numel()))
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64, device=wav.device)
    spec = torch.stft(wav, n_fft, hop_length=hop, win_length=n_fft, window=window, center=False,
                      return_complex=True)
    return spec.abs().pow(2).t()


def _floor(reference: torch.Tensor, dynamic_range_db: float) -> float:
    """``dynamic_range_db`` below the reference's peak (never below 1e-10, so silence compares equal)."""
    peak = float(reference.max()) if reference.numel() else 0.0
    if not math.isfinite(peak):
        return _POWER_FLOOR
    return max(peak * 10.0 ** (-dynamic_range_db / 10.0), _POWER_FLOOR)


def log_spectral_distance(wav_ref: torch.Tensor, wav_test: torch.Tensor, n_fft: int = 1024,
                          hop: int = 256, dynamic_range_db: float = 80.0) -> float:
    """LSD in dB between two waveforms of the same length (see the module docstring)."""
    _same_shape(wav_ref, wav_test, "log_spectral_distance")
    p_ref = power_spectrogram(wav_ref, n_fft, hop)
    p_test = power_spectrogram(wav_test, n_fft, hop)
    floor = _floor(p_ref, dynamic_range_db)
    diff = 10.0 * (p_ref.clamp_min(floor).log10() - p_test.clamp_min(floor).log10())
    return float(diff.pow(2).mean(-1).sqrt().mean())


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n): ``c = x @ D.T`` transforms the last axis of ``x``."""
    k = torch.arange(n, dtype=dtype).unsqueeze(1)
    i = torch.arange(n, dtype=dtype).unsqueeze(0)
    d = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _htk_fbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular HTK-scale filterbank (n_fft // 2 + 1, n_mels), 0 Hz to Nyquist, float64."""
    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2,
                                     dtype=torch.float64))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs.unsqueeze(1) - lo) / (mid - lo)
    down = (hi - freqs.unsqueeze(1)) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def mel_energies(wav: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256,
                 n_mels: int = 80) -> torch.Tensor:
    """Mel-filterbank power (frames, n_mels) of a 1-D waveform, float64."""
    power = power_spectrogram(wav, n_fft, hop)
    return power @ _htk_fbank(sample_rate, n_fft, n_mels).to(power.device)


def mel_cepstra(energies: torch.Tensor, floor: float = _POWER_FLOOR, n_coeffs: int = 13) -> torch.Tensor:
    """Mel-cepstra (frames, n_coeffs) ``c_1..c_n`` of mel energies (definition in the module docstring)."""
    n_mels = energies.shape[-1]
    if not 1 <= n_coeffs < n_mels:
        raise ValueError(f"n_coeffs must be in 1..{n_mels - 1}, got {n_coeffs}")
    log_amp = 0.5 * torch.log(energies.double().clamp_min(floor))
    cep = log_amp @ dct_matrix(n_mels).to(energies.device).t()
    return cep[:, 1:n_coeffs + 1]


def mel_cepstral_distortion(wav_ref: torch.Tensor, wav_test: torch.Tensor, sample_rate: int, n_fft: int = 1024,
                            hop: int = 256, n_mels: int = 80, n_coeffs: int = 13,
                            dynamic_range_db: float = 80.0) -> float:
    """MCD in dB between two waveforms of the same length, frame by frame (no time alignment)."""
    _same_shape(wav_ref, wav_test, "mel_cepstral_distortion")
    e_ref = mel_energies(wav_ref, sample_rate, n_fft, hop, n_mels)
    e_test = mel_energies(wav_test, sample_rate, n_fft, hop, n_mels)
    floor = _floor(e_ref, dynamic_range_db)
    c_ref = mel_cepstra(e_ref, floor, n_coeffs)
    c_test = mel_cepstra(e_test, floor, n_coeffs)
    per_frame = _DB * torch.sqrt(2.0 * (c_ref - c_test).pow(2).sum(-1))
    return float(per_frame.mean())
