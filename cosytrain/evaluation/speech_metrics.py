"""How far a synthesised utterance is from its recording: spectrum, pitch and timing after alignment.

A synthesis never has the recording's timing, so frame-by-frame distances (:mod:`.metrics`, made for
FP16-vs-FP32 runs of the same model) are meaningless here. Every figure below is computed on the
frames of the two signals paired by dynamic time warping (``dtw-python``, symmetric2 steps) over
their mel-cepstra:

* ``mcd`` (dB): mel-cepstral distortion along the DTW path, the cepstra of
  :func:`cosytrain.evaluation.metrics.mel_cepstra` (DCT of the log mel amplitude, c1..c13, each
  signal floored 40 dB below its own peak band, so a quiet noise is judged as the noise it is, not
  as silence). 0 for identical audio; a shift or a change of
  speaking rate costs little, a different spectrum costs a lot. The floor is what makes it measure
  what is heard: with 80 dB (the FP16 check's choice, where both signals come from one model) a
  recording's digital silence against a synthesis' faint noise dominated the average (white noise
  50 dB down scored 33 dB, as much as a Griffin-Lim resynthesis); at 40 dB it scores 0.4 dB, the
  Griffin-Lim resynthesis 6 dB, another sentence of the same voice 23 dB (demo corpus).
* ``lf0_rmse`` (cents): RMSE of ``1200 log2 F0`` over the aligned frames voiced in both signals
  (F0 from :func:`cosytrain.data.features.compute_f0`: pyworld harvest + stonemask as upstream, or
  its documented YIN stand-in where pyworld cannot be imported). 100 cents is a semitone.
* ``vde``: voicing decision error, the fraction of aligned frames voiced in one signal and not the other.
* ``duration_ratio``: synthesis length / recording length, each with leading and trailing silence
  cut (``librosa.effects.trim``, 40 dB below the peak). 1.0 is right; DTW hides timing, this shows it.

Frames are centred at multiples of ``hop`` (the STFT is padded by half a window), which is the
time axis of the F0 too, so the DTW path indexes both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cosytrain.evaluation import metrics as M

__all__ = ["AlignedFrames", "align", "speech_distances", "trimmed_seconds", "dtw_path", "SPEECH_METRICS"]

#: the names :func:`speech_distances` returns, and whether larger is better (for monitors and reports)
SPEECH_METRICS: dict[str, bool] = {"mcd": False, "lf0_rmse": False, "vde": False, "duration_ratio": False}

_DB = 10.0 / math.log(10.0)


def dtw_path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of the DTW path between frame sequences x (N, d) and y (M, d), euclidean costs."""
    from dtw import dtw  # dtw-python

    if len(x) == 0 or len(y) == 0:
        raise ValueError("dtw_path: an empty signal cannot be aligned")
    result = dtw(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), dist_method="euclidean",
                 step_pattern="symmetric2")
    return np.asarray(result.index1, dtype=np.int64), np.asarray(result.index2, dtype=np.int64)


def _centred_energies(wav: torch.Tensor, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> torch.Tensor:
    """Mel energies (frames, n_mels) with frame k centred on sample k * hop."""
    wav = wav.detach().reshape(-1).double().cpu()
    wav = F.pad(wav, (n_fft // 2, n_fft // 2))
    return M.mel_energies(wav, sample_rate, n_fft, hop, n_mels)


def trimmed_seconds(wav: torch.Tensor | np.ndarray, sample_rate: int, top_db: float = 40.0) -> float:
    """Length in seconds without leading/trailing silence (``top_db`` below the peak); 0 for silence."""
    import librosa

    audio = np.asarray(wav.detach().cpu() if isinstance(wav, torch.Tensor) else wav, dtype=np.float32).reshape(-1)
    if audio.size == 0 or not np.any(audio):
        return 0.0
    _, (start, end) = librosa.effects.trim(audio, top_db=top_db, frame_length=1024, hop_length=256)
    return float(end - start) / sample_rate


@dataclass
class AlignedFrames:
    """Cepstra, F0 and the DTW path of a reference/test pair (kept for plots and further figures)."""

    cep_ref: np.ndarray
    cep_test: np.ndarray
    f0_ref: np.ndarray
    f0_test: np.ndarray
    path_ref: np.ndarray
    path_test: np.ndarray


def align(wav_ref: torch.Tensor, wav_test: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256,
          n_mels: int = 80, n_coeffs: int = 13, dynamic_range_db: float = 40.0,
          f0_backend: str = "auto") -> AlignedFrames:
    """Mel-cepstra and F0 of both waveforms on the same frame grid, and their DTW path."""
    from cosytrain.data.features import compute_f0

    e_ref = _centred_energies(wav_ref, sample_rate, n_fft, hop, n_mels)
    e_test = _centred_energies(wav_test, sample_rate, n_fft, hop, n_mels)

    def floor(energies: torch.Tensor) -> float:
        peak = float(energies.max()) if energies.numel() else 0.0
        return max(peak * 10.0 ** (-dynamic_range_db / 10.0), 1e-10) if math.isfinite(peak) else 1e-10

    cep_ref = M.mel_cepstra(e_ref, floor(e_ref), n_coeffs).numpy()
    cep_test = M.mel_cepstra(e_test, floor(e_test), n_coeffs).numpy()

    def f0(wav: torch.Tensor, frames: int) -> np.ndarray:
        # compute_f0's native grid is k * hop for k = 0..len // hop; it is resampled to `frames`
        # points, which is the same grid when frames == len // hop + 1 (the centred STFT's count)
        return compute_f0(wav.detach().reshape(-1).float().cpu(), sample_rate, hop, frames,
                          backend=f0_backend).double().numpy()

    f0_ref, f0_test = f0(wav_ref, len(cep_ref)), f0(wav_test, len(cep_test))
    path_ref, path_test = dtw_path(cep_ref, cep_test)
    return AlignedFrames(cep_ref, cep_test, f0_ref, f0_test, path_ref, path_test)


def speech_distances(wav_ref: torch.Tensor, wav_test: torch.Tensor, sample_rate: int, n_fft: int = 1024,
                     hop: int = 256, f0_backend: str = "auto",
                     frames: Optional[AlignedFrames] = None) -> dict[str, float]:
    """``mcd``, ``lf0_rmse``, ``vde`` and ``duration_ratio`` of ``wav_test`` against ``wav_ref`` (module docstring).

    Non-finite test audio gives NaN for every figure (the caller counts it as a failure).
    """
    wav_ref = torch.as_tensor(wav_ref).reshape(-1)
    wav_test = torch.as_tensor(wav_test).reshape(-1)
    if wav_ref.numel() == 0:
        raise ValueError("speech_distances: the reference waveform is empty")
    if wav_test.numel() == 0 or not bool(torch.isfinite(wav_test).all()):
        return {name: float("nan") for name in SPEECH_METRICS}
    a = frames or align(wav_ref, wav_test, sample_rate, n_fft, hop, f0_backend=f0_backend)
    diff = a.cep_ref[a.path_ref] - a.cep_test[a.path_test]
    mcd = float(np.mean(_DB * np.sqrt(2.0 * np.sum(diff ** 2, axis=1))))
    f_ref, f_test = a.f0_ref[a.path_ref], a.f0_test[a.path_test]
    v_ref, v_test = f_ref > 0, f_test > 0
    both = v_ref & v_test
    if both.any():
        cents = 1200.0 * (np.log2(f_ref[both]) - np.log2(f_test[both]))
        lf0 = float(np.sqrt(np.mean(cents ** 2)))
    else:
        lf0 = 0.0 if not (v_ref.any() or v_test.any()) else float("nan")  # nothing voiced to compare
    vde = float(np.mean(v_ref != v_test))
    ref_s = trimmed_seconds(wav_ref, sample_rate)
    test_s = trimmed_seconds(wav_test, sample_rate)
    ratio = test_s / ref_s if ref_s > 0 else float("nan")
    return {"mcd": mcd, "lf0_rmse": lf0, "vde": vde, "duration_ratio": ratio}
