"""Scoring candidate speech-token sequences of one utterance, for choosing DPO pairs.

A scorer is any object with ``name``, ``needs_audio`` and ``score(utt, candidates) -> list[float]``
(higher is better, one number per candidate). ``python -m cosytrain dpo-pairs --scorer NAME[:WEIGHT]``
combines them as a weighted sum. The scorers that exist today:

* ``length``: ``-|log((n + 1) / (n_ref + 1))|``, how far a candidate's token count is from the
  recording's (the utterance's own ``speech_token``): catches the two common LLM failures, stopping
  early and babbling on to the length limit. Needs no audio.
* ``speaker``: speaker similarity, the cosine between the speaker embedding of the candidate's
  synthesis (flow + vocoder of the model directory) and that of the recording, both from the model
  directory's speaker encoder (``campplus.onnx``, else the built-in ``campplus_builtin.npz`` that
  ``prepare`` fitted), so the two sides are measured alike.

Adding the speech metrics of the validation-by-synthesis work (``cosytrain.evaluation``: WER/CER
through an ASR backend with ``transcribe(wav16k) -> str``, the resemblyzer/CAM++ speaker encoders,
MCD against the recording) is one class each here: ``needs_audio = True`` and a ``score`` that calls
the metric on ``Candidate.wav16k`` / ``Utterance.wav16k`` (WER: ``-wer(utt.text, transcribe(wav))``),
plus a line in :func:`build_scorers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np

__all__ = ["Utterance", "Candidate", "Scorer", "LengthScorer", "SpeakerSimilarityScorer", "build_scorers",
           "parse_scorer_specs", "SCORER_NAMES"]

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

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder  # cosytrain.data.speaker_embedding: embed_batch(list of 16 kHz arrays)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "SpeakerSimilarityScorer":
        from cosytrain.data.speaker_embedding import load_speaker_embedder
        from cosytrain.modeldir import BUILTIN_CAMPPLUS_FILE, ONNX_CAMPPLUS

        for name in (ONNX_CAMPPLUS, BUILTIN_CAMPPLUS_FILE):
            if (Path(model_dir) / name).is_file():
                return cls(load_speaker_embedder(Path(model_dir) / name))
        raise FileNotFoundError(f"--scorer speaker: {model_dir} has neither {ONNX_CAMPPLUS} nor"
                                f" {BUILTIN_CAMPPLUS_FILE} to embed speakers with")

    def score(self, utt: Utterance, candidates: Sequence[Candidate]) -> list[float]:
        if utt.wav16k is None or any(c.wav16k is None for c in candidates):
            raise ValueError("speaker scorer: the recording and every candidate need audio")
        embeddings = self.embedder.embed_batch([utt.wav16k] + [c.wav16k for c in candidates])
        return [_cosine(embeddings[0], e) for e in embeddings[1:]]


SCORER_NAMES = ("length", "speaker")


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


def build_scorers(specs: Sequence[tuple[str, float]], model_dir: str | Path) -> list[tuple[Scorer, float]]:
    """The scorers named in ``specs`` (from :func:`parse_scorer_specs`) with their weights."""
    made: list[tuple[Scorer, float]] = []
    for name, weight in specs:
        scorer: Scorer = LengthScorer() if name == "length" else SpeakerSimilarityScorer.from_model_dir(model_dir)
        made.append((scorer, weight))
    return made
