"""Scoring candidate speech-token sequences of one utterance, for choosing DPO pairs.

A scorer is any object with ``name``, ``needs_audio`` and ``score(utt, candidates) -> list[float]``
(higher is better, one number per candidate). ``python -m cosytrain dpo-pairs --scorer NAME[:WEIGHT]``
combines them as a weighted sum:

* ``speaker``: speaker similarity (SIM), the cosine between the speaker embedding of the candidate's
  synthesis (flow + vocoder of the model directory) and that of the recording, both from the same
  encoder: the validation-by-synthesis encoders of :mod:`cosytrain.evaluation.speaker_similarity`
  (``--speaker_encoder auto``: the model directory's ``campplus.onnx``, else resemblyzer's shipped
  GE2E weights), or ``builtin``, the stand-in ``campplus_builtin.npz`` that ``prepare`` fitted.
* ``wer``: minus the word error rate of the candidate's synthesis against the utterance's text,
  through an offline ASR backend (``--asr kind:path``, :mod:`cosytrain.evaluation.asr`: transformers,
  whisper, faster-whisper, funasr; never downloaded).
* ``length``: ``-|log((n + 1) / (n_ref + 1))|``, how far a candidate's token count is from the
  recording's (the utterance's own ``speech_token``): catches the two common LLM failures, stopping
  early and babbling on to the length limit. Needs no audio.

Another metric is one class here (``needs_audio`` and a ``score`` over ``Candidate.wav16k`` /
``Utterance.wav16k``) plus a line in :func:`build_scorers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np

__all__ = ["Utterance", "Candidate", "Scorer", "LengthScorer", "SpeakerSimilarityScorer", "WerScorer",
           "build_scorers", "parse_scorer_specs", "SCORER_NAMES"]

SAMPLE_RATE_16K = 16000


@dataclass
class Utterance:
    """What a scorer may know about the utterance (a prepared shard row)."""

    utt: str
    text: str
    speech_token: list[int]  # the recording's tokens
    wav16k: Optional[np.ndarray] = None  # the recording at 16 kHz (decoded only when a scorer needs audio)


@dataclass
class Candidate:
    tokens: list[int]
    wav16k: Optional[np.ndarray] = None  # its synthesis at 16 kHz (when a scorer needs audio)
    scores: dict[str, float] = field(default_factory=dict)


class Scorer(Protocol):
    name: str
    needs_audio: bool

    def score(self, utt: Utterance, candidates: Sequence[Candidate]) -> list[float]: ...


class LengthScorer:
    """Closeness of the token count to the recording's (see the module docstring)."""

    name = "length"
    needs_audio = False

    def score(self, utt: Utterance, candidates: Sequence[Candidate]) -> list[float]:
        ref = len(utt.speech_token)
        return [-abs(math.log((len(c.tokens) + 1) / (ref + 1))) for c in candidates]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else 0.0


class SpeakerSimilarityScorer:
    """Cosine of speaker embeddings: candidate synthesis vs recording, one encoder for both."""

    name = "speaker"
    needs_audio = True

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder  # anything with embed(wav16k) -> vector (evaluation.speaker_similarity)

    @classmethod
    def from_spec(cls, spec: str, model_dir: str | Path, device: str = "cpu") -> "SpeakerSimilarityScorer":
        """``builtin`` (the model directory's campplus_builtin.npz) or an evaluation encoder spec."""
        if spec == "builtin":
            from cosytrain.data.speaker_embedding import BuiltinSpeakerEmbedding
            from cosytrain.modeldir import BUILTIN_CAMPPLUS_FILE

            path = Path(model_dir) / BUILTIN_CAMPPLUS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"--speaker_encoder builtin: {path} not found; use auto, campplus or resemblyzer")
            return cls(_BatchEmbedder(BuiltinSpeakerEmbedding.load(path)))
        from cosytrain.evaluation.speaker_similarity import SpeakerEncoderError, load_speaker_encoder

        try:
            return cls(load_speaker_encoder(spec, model_dir, device=device))
        except SpeakerEncoderError as exc:
            raise ValueError(f"--speaker_encoder: {exc}") from None

    def score(self, utt: Utterance, candidates: Sequence[Candidate]) -> list[float]:
        if utt.wav16k is None or any(c.wav16k is None for c in candidates):
            raise ValueError("speaker scorer: the recording and every candidate need audio")
        reference = self.encoder.embed(utt.wav16k)
        return [_cosine(reference, self.encoder.embed(c.wav16k)) for c in candidates]


class _BatchEmbedder:
    """``data.speaker_embedding``'s ``embed_batch`` embedders seen as ``embed(wav16k)``."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedder.embed_batch([wav16k])[0])


class WerScorer:
    """Minus the WER of the candidate's synthesis against the text (an offline ASR backend)."""

    name = "wer"
    needs_audio = True

    def __init__(self, asr: Any) -> None:
        self.asr = asr  # anything with transcribe(wav16k) -> str (evaluation.asr)

    def score(self, utt: Utterance, candidates: Sequence[Candidate]) -> list[float]:
        from cosytrain.evaluation.asr import error_rates

        if any(c.wav16k is None for c in candidates):
            raise ValueError("wer scorer: every candidate needs audio")
        return [-error_rates(utt.text, self.asr.transcribe(c.wav16k))["wer"] for c in candidates]


SCORER_NAMES = ("speaker", "wer", "length")


def parse_scorer_specs(specs: Sequence[str]) -> list[tuple[str, float]]:
    """``["speaker:2", "length"]`` -> ``[("speaker", 2.0), ("length", 1.0)]``; one line for a bad one."""
    out = []
    for spec in specs:
        name, _, weight = str(spec).partition(":")
        if name not in SCORER_NAMES:
            raise ValueError(f"--scorer {spec!r}: unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--scorer {spec!r}: the weight after ':' must be a number") from None
        out.append((name, value))
    return out


def build_scorers(specs: Sequence[tuple[str, float]], model_dir: str | Path, speaker_encoder: str = "auto",
                  asr: Optional[str] = None, device: str = "cpu") -> list[tuple[Scorer, float]]:
    """The scorers named in ``specs`` (from :func:`parse_scorer_specs`) with their weights."""
    made: list[tuple[Scorer, float]] = []
    for name, weight in specs:
        scorer: Scorer
        if name == "length":
            scorer = LengthScorer()
        elif name == "speaker":
            scorer = SpeakerSimilarityScorer.from_spec(speaker_encoder, model_dir, device)
        else:
            if not asr:
                raise ValueError("--scorer wer needs an ASR backend: --asr kind:path (transformers, whisper,"
                                 " faster-whisper or funasr; a local model, never downloaded)")
            from cosytrain.evaluation.asr import AsrError, load_asr

            try:
                scorer = WerScorer(load_asr(asr, device=device))
            except AsrError as exc:
                raise ValueError(str(exc)) from None
        made.append((scorer, weight))
    return made
