"""Acoustic features for training: log-mel spectrogram (as matcha/CosyVoice) and frame-level F0.

``mel_spectrogram`` reproduces ``matcha.utils.audio.mel_spectrogram`` (the CosyVoice
``feat_extractor``), with librosa's Slaney filterbank taken from torchaudio
(:func:`slaney_mel_filterbank`, also the whisper filterbank of the speech tokenizer's log-mel), so
librosa is not needed.

``compute_f0`` mirrors upstream ``cosyvoice/dataset/processor.py::compute_f0``: pyworld harvest (dio
if harvest finds fewer than 5 voiced frames) + stonemask at one frame per hop, linearly resampled to
the number of mel frames. The ``vocoder`` extra installs ``pyworld-prebuilt`` (wheels of the same
``pyworld`` module; the original ``pyworld`` is an sdist that needs a C++ build and, up to 0.3.5,
``pkg_resources`` at import); both give bit-identical F0 (pyworld 0.3.4, upstream's pin, too). When
pyworld is not importable a documented stand-in is used: a YIN estimator (``yin_f0``) on the same
time axis, giving Hz per frame and 0 for unvoiced frames. Its values are close to, not equal to,
pyworld's, so ``HiFTTask`` logs the backend and refuses it for pretrained weights unless told.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mel_spectrogram", "slaney_mel_filterbank", "compute_f0", "yin_f0", "f0_backend", "f0_backend_problem"]

# ----------------------------------------------------------------------------------------- mel


def slaney_mel_filterbank(sampling_rate: int, n_fft: int, num_mels: int, fmin: float = 0.0,
                          fmax: Optional[float] = None) -> torch.Tensor:
    """(num_mels, n_fft//2+1) float32 triangular filters, Slaney mel scale and area normalisation.

    What ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` gives with its defaults (htk=False,
    norm='slaney'), as matcha and whisper use it, computed by torchaudio (in float32, where librosa
    computes in float64: the filters differ by < 1e-7, the reference fixtures' log-mels by < 2e-5).
    """
    import torchaudio.functional as AF

    f_max = float(sampling_rate) / 2 if fmax is None else float(fmax)
    bank = AF.melscale_fbanks(n_freqs=n_fft // 2 + 1, f_min=float(fmin), f_max=f_max, n_mels=int(num_mels),
                              sample_rate=int(sampling_rate), norm="slaney", mel_scale="slaney")
    return bank.T.contiguous()


# Upstream matcha caches the filterbank under str(fmax)+device and the window under the device only,
# so a second configuration with the same fmax silently reuses the first one's filterbank and window.
# Here both caches are keyed by every parameter they depend on.
_MEL_BASIS: dict[tuple, torch.Tensor] = {}
_HANN_WINDOW: dict[tuple, torch.Tensor] = {}


def _mel_basis(sampling_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: Optional[float],
               device: torch.device) -> torch.Tensor:
    key = (int(sampling_rate), int(n_fft), int(num_mels), float(fmin), None if fmax is None else float(fmax), str(device))
    if key not in _MEL_BASIS:
        with torch.inference_mode(False):  # cached: an inference tensor would break a later backward
            _MEL_BASIS[key] = slaney_mel_filterbank(sampling_rate, n_fft, num_mels, fmin, fmax).to(device)
    return _MEL_BASIS[key]


def _hann(win_size: int, device: torch.device) -> torch.Tensor:
    key = (int(win_size), str(device))
    if key not in _HANN_WINDOW:
        with torch.inference_mode(False):  # first use may be in Lightning's validation (inference mode)
            _HANN_WINDOW[key] = torch.hann_window(win_size).to(device)
    return _HANN_WINDOW[key]


def mel_spectrogram(y: torch.Tensor, n_fft: int, num_mels: int, sampling_rate: int, hop_size: int,
                    win_size: int, fmin: float, fmax: Optional[float], center: bool = False) -> torch.Tensor:
    """Waveform (B, L) in [-1, 1] -> natural-log mel (B, num_mels, frames), as matcha's mel_spectrogram.

    Reflect-pads (n_fft - hop)/2 per side, magnitude sqrt(re^2 + im^2 + 1e-9), Slaney filterbank,
    log(clamp(x, 1e-5)). Always computed in FP32 with autocast off (it also feeds the GAN mel loss).
    """
    if y.dim() == 1:
        y = y.unsqueeze(0)
    if y.dim() != 2:
        raise ValueError(f"mel_spectrogram: expected a waveform of shape (B, L), got {tuple(y.shape)}")
    with torch.autocast(device_type=y.device.type, enabled=False):
        y = y.float()
        pad = int((n_fft - hop_size) / 2)
        y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size, window=_hann(win_size, y.device),
                          center=center, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        spec = torch.view_as_real(spec)
        spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        spec = torch.matmul(_mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax, y.device), spec)
        return torch.log(torch.clamp(spec, min=1e-5))


# ----------------------------------------------------------------------------------------- F0

F0_FLOOR = 71.0  # pyworld harvest/dio default search range
F0_CEIL = 800.0


def f0_backend_problem() -> str | None:
    """Why pyworld cannot be used (one line), or None when it imports."""
    try:
        import pyworld  # noqa: F401
    except ImportError as err:  # not installed, or installed but broken (pyworld <= 0.3.5 needs pkg_resources)
        if getattr(err, "name", None) == "pyworld" or "pyworld" in str(err) and "No module named" in str(err):
            return "pyworld is not installed"
        return f"pyworld is installed but does not import ({type(err).__name__}: {err})"
    return None


def f0_backend() -> str:
    """'pyworld' when it can be imported (exact upstream), else 'yin' (the stand-in)."""
    return "pyworld" if f0_backend_problem() is None else "yin"


def yin_f0(wav: np.ndarray, sample_rate: int, hop_size: int, f0_floor: float = F0_FLOOR,
           f0_ceil: float = F0_CEIL, threshold: float = 0.15, silence_db: float = -60.0) -> np.ndarray:
    """YIN (de Cheveigne & Kawahara 2002) F0 in Hz at times k*hop_size, k = 0..len//hop_size; 0 = unvoiced.

    The time axis matches pyworld's for ``frame_period = hop_size*1000/sample_rate``. A frame is
    unvoiced when its cumulative-mean-normalised difference never drops below ``threshold`` within
    the search range, or when its RMS is below ``silence_db`` dBFS.
    """
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    tau_min = max(2, int(math.floor(sample_rate / f0_ceil)))
    tau_max = int(math.ceil(sample_rate / f0_floor))
    width = tau_max  # integration window: at least one period of the lowest F0
    frame_len = width + tau_max + 1
    n_frames = len(wav) // hop_size + 1
    half = frame_len // 2
    padded = np.pad(wav, (half, half + hop_size))
    idx = np.arange(n_frames)[:, None] * hop_size + np.arange(frame_len)[None, :]
    frames = padded[idx]  # (n_frames, frame_len), frame k centred on sample k*hop
    frames = frames - frames.mean(axis=1, keepdims=True)

    n = 1 << int(math.ceil(math.log2(2 * frame_len)))
    spec_full = np.fft.rfft(frames, n=n, axis=1)
    spec_head = np.fft.rfft(frames[:, :width], n=n, axis=1)
    cross = np.fft.irfft(np.conj(spec_head) * spec_full, n=n, axis=1)[:, :tau_max + 1]
    sq = np.concatenate([np.zeros((n_frames, 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    energy_0 = sq[:, width:width + 1]
    energy_tau = sq[:, taus + width] - sq[:, taus]
    diff = np.maximum(energy_0 + energy_tau - 2 * cross, 0.0)
    cmnd = np.ones_like(diff)
    cums = np.cumsum(diff[:, 1:], axis=1)
    cmnd[:, 1:] = diff[:, 1:] * taus[1:] / np.maximum(cums, 1e-12)

    rms_db = 10 * np.log10(np.maximum(energy_0[:, 0] / width, 1e-20))
    f0 = np.zeros(n_frames)
    for k in range(n_frames):
        if rms_db[k] < silence_db:
            continue
        row = cmnd[k]
        below = np.nonzero(row[tau_min:tau_max] < threshold)[0]
        if below.size == 0:
            continue
        tau = tau_min + int(below[0])
        while tau + 1 < tau_max and row[tau + 1] < row[tau]:
            tau += 1
        a, b, c = row[tau - 1], row[tau], row[tau + 1]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if abs(denom) > 1e-12 else 0.0
        period = tau + float(np.clip(shift, -1.0, 1.0))
        value = sample_rate / period
        if f0_floor <= value <= f0_ceil:
            f0[k] = value
    return f0


def _pyworld_f0(wav: np.ndarray, sample_rate: int, hop_size: int) -> np.ndarray:
    import pyworld as pw

    frame_period = hop_size * 1000 / sample_rate
    f0, t = pw.harvest(wav, sample_rate, frame_period=frame_period)
    if sum(f0 != 0) < 5:  # harvest failed; upstream retries with dio
        f0, t = pw.dio(wav, sample_rate, frame_period=frame_period)
    return pw.stonemask(wav, f0, t, sample_rate)


def compute_f0(waveform: torch.Tensor, sample_rate: int, hop_size: int, num_frames: int,
               backend: Literal["auto", "pyworld", "yin"] = "auto") -> torch.Tensor:
    """Waveform (1, L) or (L,) -> F0 in Hz per mel frame, shape (num_frames,), float32 (``pitch_feat``).

    ``num_frames`` is the mel frame count (upstream: ``speech_feat.shape[0]``); the hop-rate F0 is
    resampled to it with linear interpolation as upstream does. Upstream keeps float64; we return
    float32 like every other feature.
    """
    if waveform.dim() == 2:
        if waveform.shape[0] != 1:
            raise ValueError(f"compute_f0: expected one channel (1, L), got {tuple(waveform.shape)}")
        waveform = waveform[0]
    wav = waveform.detach().cpu().numpy().astype("double")
    if backend == "auto":
        backend = "pyworld" if f0_backend() == "pyworld" else "yin"
    if backend == "pyworld":
        f0 = _pyworld_f0(wav, sample_rate, hop_size)
    elif backend == "yin":
        f0 = yin_f0(wav, sample_rate, hop_size)
    else:
        raise ValueError(f"compute_f0: backend must be 'auto', 'pyworld' or 'yin', got {backend!r}")
    f0_t = torch.from_numpy(np.ascontiguousarray(f0)).view(1, 1, -1)
    return F.interpolate(f0_t, size=int(num_frames), mode="linear").view(-1).float()
