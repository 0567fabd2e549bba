"""Audio that decodes "successfully" but is not what it claims to be, checked before it becomes training data.

libsndfile reads a WAV whose header promises more audio than the file holds without an error (it
quietly returns what is there), a recording at 1 Hz or 2 MHz "decodes", and so do silence,
clipping, stereo and a FLAC named ``.wav``. What ``prepare`` does with each (``docs/reliability.md``,
section 4):

skipped (the row is unusable or would teach the model something wrong)
    truncated (header frames > frames present), sample rate below ``min_sample_rate`` or above
    ``MAX_SAMPLE_RATE``, silence (peak below ``SILENCE_DBFS`` after the down-mix), no samples,
    NaN/Inf samples;
kept and flagged in ``flagged.tsv`` (usable as upstream uses it; worth a look)
    clipping (more than ``CLIP_FRACTION`` of samples at full scale), more than one channel (averaged
    to mono as upstream does), a container that does not match the file extension (decoders read
    the content, not the name).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_SAMPLE_RATE = 192_000
SILENCE_DBFS = -60.0
CLIP_FRACTION = 0.001
_FORMAT_SUFFIXES = {"WAV": {".wav", ".wave"}, "WAVEX": {".wav", ".wave"}, "RF64": {".wav", ".rf64"},
                    "FLAC": {".flac"}, "OGG": {".ogg", ".oga", ".opus"}, "MP3": {".mp3"}, "MPEG": {".mp3"},
                    "AIFF": {".aif", ".aiff", ".aifc"}, "AU": {".au", ".snd"}, "W64": {".w64"}, "CAF": {".caf"}}
_KNOWN_SUFFIXES = set().union(*_FORMAT_SUFFIXES.values())


@dataclass
class CheckedAudio:
    audio: np.ndarray  # mono float32
    sample_rate: int
    notes: list[str] = field(default_factory=list)  # flagged, not skipped

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def declared_wav_frames(data: bytes) -> int | None:
    """Frames a RIFF/WAVE header declares in its ``data`` chunk; None when not a WAV or length unknown."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 22 <= len(data):
            block_align = struct.unpack("<H", data[pos + 20:pos + 22])[0]
        elif cid == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):  # streamed WAVs leave the size unset
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def check_audio(data: bytes, name: str, min_sample_rate: int = 16000) -> CheckedAudio | str:
    """Decode ``data`` (the file's bytes; ``name`` for the extension) or say in one line why it is unusable."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, header_frames = f.format, f.frames
            audio = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except Exception as ex:  # noqa: BLE001 - any decoder failure means the row is unusable
        msg = str(ex).strip().splitlines()
        return f"undecodable audio ({type(ex).__name__}: {msg[0] if msg else ''})"
    if not sr or sr <= 0:
        return "unknown sample rate"
    if audio.size == 0:
        return "empty audio"
    declared = declared_wav_frames(data)
    declared = declared if declared is not None else (header_frames if 0 < header_frames < 2**62 else None)
    if declared is not None and declared > audio.shape[0]:
        return (f"truncated audio: the header declares {declared} frames ({declared / sr:.2f}s) but the file holds"
                f" {audio.shape[0]} ({audio.shape[0] / sr:.2f}s)")
    if sr > MAX_SAMPLE_RATE:
        return f"implausible sample rate {sr} Hz in the header (above {MAX_SAMPLE_RATE} Hz)"
    if sr < min_sample_rate:
        return f"sample rate {sr} Hz is below --min_sample_rate {min_sample_rate} Hz"
    if not np.isfinite(audio).all():
        return "audio has NaN or Inf samples"
    notes = []
    full_scale = float(np.mean(np.abs(audio) >= 0.999))
    if full_scale > CLIP_FRACTION:
        notes.append(f"clipped: {100 * full_scale:.2f}% of samples at full scale")
    if audio.shape[1] > 1:
        notes.append(f"{audio.shape[1]} channels averaged to mono")
    suffix = Path(name).suffix.lower()
    if suffix in _KNOWN_SUFFIXES and suffix not in _FORMAT_SUFFIXES.get(fmt, {suffix}):
        notes.append(f"the file is {fmt} but named {suffix}")
    mono = audio.mean(axis=1)
    peak = float(np.abs(mono).max())
    if peak == 0.0:
        return "silent audio (all samples are zero)"
    if 20 * np.log10(peak) < SILENCE_DBFS:
        return f"silent audio (peak {20 * np.log10(peak):.0f} dBFS < {SILENCE_DBFS:.0f} dBFS)"
    return CheckedAudio(mono.astype(np.float32, copy=False), int(sr), notes)
