"""Intelligibility: WER/CER of a synthesis through a speech recogniser the user points at, offline.

A backend is any object with ``transcribe(wav16k: np.ndarray) -> str``. :func:`load_asr` builds one
from a spec ``"<kind>:<local path>"``; every kind loads from a local folder or file only (nothing is
downloaded: the Hugging Face hub is switched to offline for the load, and a path that does not exist
is an error naming it):

* ``transformers:<dir>``: a ``transformers`` ASR pipeline (Whisper, wav2vec2/CTC, ...) saved with
  ``save_pretrained`` (model + processor files).
* ``whisper:<file.pt>``: an openai-whisper checkpoint (``pip install openai-whisper``).
* ``faster-whisper:<dir>``: a CTranslate2 model folder (``pip install faster-whisper``).
* ``funasr:<dir>``: a FunASR model folder, e.g. SenseVoiceSmall (``pip install funasr``).

Only ``transformers`` is exercised by the test suite (with a tiny randomly initialised model built in a
temporary folder); the other three are thin adapters over their libraries' documented load and
transcribe calls, and are not installed in CI.

Error rates come from ``jiwer`` after a light normalisation (lower case, punctuation removed,
whitespace collapsed), the same for reference and hypothesis, so "Hello, world." and "hello world"
match. CER is computed on the normalised strings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from cosytrain.errors import ConfigurationError

__all__ = ["AsrBackend", "AsrError", "load_asr", "normalize_text", "error_rates", "TransformersAsr"]

SAMPLE_RATE = 16000


class AsrError(ConfigurationError, RuntimeError):
    """The recogniser cannot be loaded (bad spec, missing path or package); one line naming the fix (a
    ``ConfigurationError``: the CLI prints it as one line)."""


class AsrBackend(Protocol):
    name: str

    def transcribe(self, wav16k: np.ndarray) -> str: ...


def normalize_text(text: str) -> str:
    """Lower case, Unicode punctuation and symbols dropped (apostrophes inside words kept), blanks collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\w)'(?=\w)", "\u0000", text)  # keep don't / it's
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.replace("\u0000", "'").split())


def error_rates(reference: str, hypothesis: str) -> dict[str, float]:
    """``{'wer': ..., 'cer': ...}`` of one utterance after :func:`normalize_text` (jiwer).

    An empty normalised reference gives 0 for an empty hypothesis and 1 otherwise (jiwer refuses it).
    """
    import jiwer

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return {"wer": float(bool(hyp)), "cer": float(bool(hyp))}
    return {"wer": float(jiwer.wer(ref, hyp)), "cer": float(jiwer.cer(ref, hyp))}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face libraries must not reach the network while a local model loads."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _need(package: str, kind: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise AsrError(f"ASR backend {kind!r} needs the {package} package; pip install {package.replace('_', '-')}")


class TransformersAsr:
    """``transformers.pipeline('automatic-speech-recognition', model=<local dir>)``."""

    name = "transformers"

    def __init__(self, path: str | Path, device: str = "cpu", **generate_kwargs: Any) -> None:
        _need("transformers", "transformers")
        import transformers

        with _offline():
            self.pipe = transformers.pipeline("automatic-speech-recognition", model=str(path), device=device,
                                              model_kwargs={"local_files_only": True})
        self.generate_kwargs = generate_kwargs

    def transcribe(self, wav16k: np.ndarray) -> str:
        audio = {"raw": np.asarray(wav16k, dtype=np.float32).reshape(-1), "sampling_rate": SAMPLE_RATE}
        kwargs = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        out = self.pipe(audio, **kwargs)
        return str(out["text"] if isinstance(out, dict) else out).strip()


class WhisperAsr:
    """openai-whisper: ``whisper.load_model(<local .pt>)`` and ``model.transcribe``."""

    name = "whisper"

    def __init__(self, path: str | Path, device: str = "cpu", language: str | None = "en") -> None:
        _need("whisper", "whisper")
        import whisper

        self.model = whisper.load_model(str(path), device=device)
        self.language = language

    def transcribe(self, wav16k: np.ndarray) -> str:
        out = self.model.transcribe(np.asarray(wav16k, dtype=np.float32), language=self.language, fp16=False,
                                    temperature=0.0)
        return str(out["text"]).strip()


class FasterWhisperAsr:
    """faster-whisper: ``WhisperModel(<local CTranslate2 dir>)``."""

    name = "faster-whisper"

    def __init__(self, path: str | Path, device: str = "cpu", language: str | None = "en") -> None:
        _need("faster_whisper", "faster-whisper")
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(path), device=device, compute_type="float32", local_files_only=True)
        self.language = language

    def transcribe(self, wav16k: np.ndarray) -> str:
        segments, _ = self.model.transcribe(np.asarray(wav16k, dtype=np.float32), language=self.language, beam_size=1)
        return " ".join(s.text.strip() for s in segments).strip()


class FunAsr:
    """FunASR ``AutoModel(model=<local dir>)`` (Paraformer, SenseVoice, ...), rich-text tags removed."""

    name = "funasr"

    def __init__(self, path: str | Path, device: str = "cpu", language: str = "auto") -> None:
        _need("funasr", "funasr")
        from funasr import AutoModel

        with _offline():
            self.model = AutoModel(model=str(path), device=device, disable_update=True)
        self.language = language

    def transcribe(self, wav16k: np.ndarray) -> str:
        out = self.model.generate(input=np.asarray(wav16k, dtype=np.float32), language=self.language, use_itn=False)
        text = out[0]["text"] if out else ""
        return re.sub(r"<\|[^|]*\|>", "", str(text)).strip()  # SenseVoice's <|en|><|NEUTRAL|>... tags


_KINDS = {"transformers": TransformersAsr, "whisper": WhisperAsr, "faster-whisper": FasterWhisperAsr, "funasr": FunAsr}


def load_asr(spec: str, device: str = "cpu") -> AsrBackend:
    """A backend from ``"<kind>:<local path>"`` (module docstring); the path must exist."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in _KINDS or not path:
        raise AsrError(f"asr {spec!r}: use '<kind>:<local path>' with kind one of {', '.join(_KINDS)}"
                       " (e.g. transformers:/models/whisper-small)")
    if not Path(path).exists():
        raise AsrError(f"asr {spec!r}: {path} not found; ASR models are never downloaded here, give a local"
                       " folder or file")
    try:
        return _KINDS[kind](path, device=device)
    except AsrError:
        raise
    except Exception as exc:  # the libraries fail in many ways on a wrong folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AsrError(f"asr {spec!r}: cannot load the {kind} model from {path} ({first})") from None
