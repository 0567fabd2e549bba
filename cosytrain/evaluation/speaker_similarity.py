"""Speaker similarity (SIM): the cosine of two speaker embeddings, from an encoder that runs offline.

Two encoders, chosen by :func:`load_speaker_encoder`:

* ``campplus``: upstream's ``campplus.onnx`` (CAM++, 192-dim) when the model directory has one; this
  is how the CosyVoice papers measure SIM, so the figures are comparable with theirs in kind (they use
  a WavLM-based verifier for the published tables; CAM++ is the one shipped with the models).
* ``resemblyzer``: the GE2E d-vector encoder (3-layer LSTM over 40 mel bands, 256-dim) whose trained
  weights ship inside the ``resemblyzer`` wheel, so nothing is downloaded.

Why the resemblyzer network is rebuilt here instead of imported: ``import resemblyzer`` imports its
``audio`` module, which imports ``webrtcvad`` 2.0.10 (resemblyzer's pinned dependency), which imports
``pkg_resources`` at import time; current setuptools no longer provides it, so the package cannot be
imported in a fresh environment. The network, its mel input (librosa, 16 kHz, 25 ms / 10 ms, 40
bands, power) and the partial-utterance averaging (1.6 s windows at 1.3 per second, last one kept at
75 % coverage) follow ``resemblyzer.VoiceEncoder.embed_utterance`` line for line, and the shipped
``pretrained.pt`` is read with ``weights_only=True``; ``tests/evaluation/test_speaker_similarity.py``
checks the embeddings equal the library's own. Resemblyzer's ``preprocess_wav`` also normalises the
volume (done here) and cuts pauses longer than ~0.2 s with webrtcvad (not done: the utterances
compared here are single sentences).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["SpeakerEncoder", "ResemblyzerEncoder", "CampplusEncoder", "load_speaker_encoder", "cosine",
           "to_16k", "SpeakerEncoderError"]

SAMPLE_RATE = 16000


class SpeakerEncoderError(RuntimeError):
    """No speaker encoder can be built (missing package or file); one line naming the fix."""


class SpeakerEncoder(Protocol):
    name: str

    def embed(self, wav16k: np.ndarray) -> np.ndarray: ...


def to_16k(wav: torch.Tensor | np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 numpy at 16 kHz (torchaudio's resampler)."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not isinstance(wav, torch.Tensor) else wav)
    x = x.detach().float().cpu().reshape(-1)
    if sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        x = AF.resample(x, int(sample_rate), SAMPLE_RATE)
    return x.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embeddings (0 when either is zero)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# resemblyzer (GE2E d-vector)
# --------------------------------------------------------------------------------------------------

_MEL_WINDOW_MS, _MEL_STEP_MS, _MEL_BANDS = 25, 10, 40
_PARTIAL_FRAMES = 160
_NORM_TARGET_DBFS = -30.0


def resemblyzer_weights() -> Path:
    """``pretrained.pt`` inside the installed resemblyzer package (found without importing it)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerEncoderError("speaker similarity needs the resemblyzer package (its wheel ships the encoder"
                                  " weights): pip install resemblyzer, or give a model directory with campplus.onnx")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise SpeakerEncoderError(f"{path} not found: the resemblyzer installation is incomplete; reinstall it")
    return path


class _GE2E(nn.Module):
    """resemblyzer's ``VoiceEncoder`` network (same attribute names, so its state dict loads)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(_MEL_BANDS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)


def _partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[slice]:
    """resemblyzer ``compute_partial_slices``: mel-frame windows of 160 frames covering the utterance."""
    samples_per_frame = SAMPLE_RATE * _MEL_STEP_MS // 1000
    n_frames = int(np.ceil((n_samples + 1) / samples_per_frame))
    frame_step = int(np.round((SAMPLE_RATE / rate) / samples_per_frame))
    steps = max(1, n_frames - _PARTIAL_FRAMES + frame_step + 1)
    slices = [slice(i, i + _PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last = slices[-1]
    coverage = (n_samples - last.start * samples_per_frame) / (_PARTIAL_FRAMES * samples_per_frame)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


class ResemblyzerEncoder:
    """GE2E speaker embeddings with the weights shipped in the resemblyzer wheel (module docstring)."""

    name = "resemblyzer"

    def __init__(self, weights: Optional[str | Path] = None, device: str | torch.device = "cpu") -> None:
        path = Path(weights) if weights is not None else resemblyzer_weights()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise SpeakerEncoderError(f"{path}: not a resemblyzer checkpoint (no model_state)")
        self.net = _GE2E()
        # resemblyzer loads with strict=False: its checkpoint also holds the GE2E loss's similarity
        # weight/bias, which the encoder does not use
        state = {k: v for k, v in state.items() if k.split(".")[0] in ("lstm", "linear")}
        self.net.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        self.net.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def mel(wav16k: np.ndarray) -> np.ndarray:
        """(frames, 40) power mel, resemblyzer's ``wav_to_mel_spectrogram``."""
        import librosa

        frames = librosa.feature.melspectrogram(y=wav16k, sr=SAMPLE_RATE, n_fft=SAMPLE_RATE * _MEL_WINDOW_MS // 1000,
                                                hop_length=SAMPLE_RATE * _MEL_STEP_MS // 1000, n_mels=_MEL_BANDS)
        return frames.astype(np.float32).T

    @staticmethod
    def normalize_volume(wav16k: np.ndarray) -> np.ndarray:
        """resemblyzer ``normalize_volume(wav, -30, increase_only=True)``."""
        rms = np.sqrt(np.mean((wav16k * 32767) ** 2))
        if rms <= 0:
            return wav16k
        change_db = _NORM_TARGET_DBFS - 20 * np.log10(rms / 32767)
        return wav16k * (10 ** (change_db / 20)) if change_db > 0 else wav16k

    def embed(self, wav16k: np.ndarray, normalize: bool = True) -> np.ndarray:
        """A 256-dim unit vector for one 16 kHz utterance (``embed_utterance``)."""
        wav = np.asarray(wav16k, dtype=np.float32).reshape(-1)
        if normalize:
            wav = self.normalize_volume(wav).astype(np.float32)
        slices = _partial_slices(len(wav))
        need = slices[-1].stop * (SAMPLE_RATE * _MEL_STEP_MS // 1000)
        if need >= len(wav):
            wav = np.pad(wav, (0, need - len(wav)), "constant")
        mel = self.mel(wav)
        mels = torch.from_numpy(np.array([mel[s] for s in slices])).to(self.device)
        with torch.no_grad():
            partial = self.net(mels).cpu().numpy()
        raw = partial.mean(axis=0)
        return raw / np.linalg.norm(raw, 2)


# --------------------------------------------------------------------------------------------------
# campplus.onnx
# --------------------------------------------------------------------------------------------------


class CampplusEncoder:
    """Upstream's CAM++ (``campplus.onnx``), fed exactly as ``prepare`` feeds it (Kaldi fbank, mean removed)."""

    name = "campplus"

    def __init__(self, path: str | Path) -> None:
        from cosytrain.data.speaker_embedding import OnnxCampplus

        if importlib.util.find_spec("onnxruntime") is None:
            raise SpeakerEncoderError(f"{path}: running campplus.onnx needs onnxruntime; pip install onnxruntime")
        self.model = OnnxCampplus(path, batch_size=1)

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.embed_batch([np.asarray(wav16k, dtype=np.float32)])[0], dtype=np.float32)


def load_speaker_encoder(spec: str = "auto", model_dir: Optional[str | Path] = None,
                         device: str | torch.device = "cpu") -> SpeakerEncoder:
    """``auto``: ``<model_dir>/campplus.onnx`` when there is one, else resemblyzer; or a ``.onnx`` path,
    ``campplus`` (needs ``model_dir``) or ``resemblyzer``."""
    onnx = Path(model_dir) / "campplus.onnx" if model_dir is not None else None
    if spec == "auto":
        if onnx is not None and onnx.is_file():
            return CampplusEncoder(onnx)
        return ResemblyzerEncoder(device=device)
    if spec == "resemblyzer":
        return ResemblyzerEncoder(device=device)
    if spec == "campplus":
        if onnx is None or not onnx.is_file():
            raise SpeakerEncoderError(f"speaker encoder 'campplus': no campplus.onnx in {model_dir}; give the model"
                                      " directory that has it, or use 'resemblyzer'")
        return CampplusEncoder(onnx)
    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise SpeakerEncoderError(f"speaker encoder {spec}: file not found")
        return CampplusEncoder(spec)
    raise SpeakerEncoderError(f"speaker encoder {spec!r}: use 'auto', 'resemblyzer', 'campplus' or a campplus .onnx path")


def similarity(encoder: SpeakerEncoder, wav_a: np.ndarray, wav_b: np.ndarray) -> float:
    """SIM of two 16 kHz utterances."""
    return cosine(encoder.embed(wav_a), encoder.embed(wav_b))


def embed_many(encoder: SpeakerEncoder, wavs16k: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [encoder.embed(w) for w in wavs16k]
