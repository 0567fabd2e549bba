"""The inference front end: text and prompt audio -> the tensors ``CosyVoiceModel.tts`` takes.

Mirrors upstream ``cosyvoice/cli/frontend.py`` (``CosyVoiceFrontEnd``): the same method names
(``frontend_sft``, ``frontend_zero_shot``, ``frontend_cross_lingual``, ``frontend_instruct``,
``frontend_instruct2``, ``frontend_vc``, ``text_normalize``) and the same ``model_input`` keys, so
the model code is shared. What each piece is made from, per model directory:

* text tokens: the generation's tokenizer. CosyVoice 1 uses whisper's multilingual BPE unless the
  directory's ``cosytrain.json`` names another (``"text_tokenizer": "byte"``, or the exporter's
  ``"run_text_tokenizer"``), CosyVoice 2 the Qwen tokenizer in ``CosyVoice-BlankEN/``, CosyVoice 3
  the same folder with v3's extra special tokens.
* prompt speech tokens: ``speech_tokenizer_v1.onnx`` / ``_v2`` / ``_v3`` (upstream's files), else
  the built-in k-means stand-in ``speech_tokenizer_builtin.npz`` that ``prepare`` fits.
* speaker embedding: ``campplus.onnx``, else the built-in ``campplus_builtin.npz``.
* prompt mel: :func:`cosytrain.data.features.mel_spectrogram` with the config's ``feat_extractor``
  parameters (upstream's defaults for the generation when the config has none).
* ``spk2info.pt``: loaded with ``torch.load(weights_only=True)`` (tensors and dicts only).

Nothing is read before it is needed: a directory without ONNX files still does ``inference_sft``.

Text normalisation is :mod:`cosytrain.inference.text_normalizer`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cosytrain.inference.text_normalizer import text_normalize
from cosytrain.modeldir import (
    BUILTIN_CAMPPLUS_FILE,
    BUILTIN_TOKENIZER_FILE,
    METADATA_FILE,
    ONNX_CAMPPLUS,
    ONNX_SPEECH_TOKENIZERS,
    QWEN_DIR,
    SPK2INFO_FILE,
)

__all__ = [
    "FrontEndError",
    "CosyVoiceFrontEnd",
    "text_tokenizer_spec",
    "feat_params",
    "load_wav",
    "load_spk2info",
]

TOKEN_RATE = {"v1": 50, "v2": 25, "v3": 25}
MAX_PROMPT_SECONDS = 30  # upstream refuses longer prompts (the tokenizer's whisper encoder spans 30 s)

# upstream's feat_extractor (matcha mel_spectrogram) per generation, used when a config has none
_DEFAULT_FEAT = {
    "v1": dict(n_fft=1024, num_mels=80, hop_size=256, win_size=1024, fmin=0, fmax=8000, center=False),
    "v2": dict(n_fft=1920, num_mels=80, hop_size=480, win_size=1920, fmin=0, fmax=8000, center=False),
    "v3": dict(n_fft=1920, num_mels=80, hop_size=480, win_size=1920, fmin=0, fmax=8000, center=False),
}
_DEFAULT_SAMPLE_RATE = {"v1": 22050, "v2": 24000, "v3": 24000}


class FrontEndError(ValueError):
    """Bad input to the front end (unknown speaker, unreadable prompt, missing file); one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------
# Files of a model directory
# --------------------------------------------------------------------------------------------------


def read_metadata(model_dir: Path) -> dict[str, Any]:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FrontEndError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FrontEndError(f"{path}: expected a JSON object")
    return data


def text_tokenizer_spec(model_dir: str | Path, generation: str) -> tuple[str, str | None]:
    """(kind, path) of the text tokenizer a model directory's LLM was trained with."""
    model_dir = Path(model_dir)
    meta = read_metadata(model_dir)
    kind = meta.get("text_tokenizer") or meta.get("run_text_tokenizer")
    path = meta.get("text_tokenizer_path")
    if generation == "v1":
        kind = kind or "whisper"
    else:
        kind = kind or ("qwen3" if generation == "v3" else "qwen")
        if kind in ("qwen", "qwen2", "qwen3") and path is None:
            path = str(model_dir / QWEN_DIR)
    if path is not None and not Path(path).is_absolute():
        path = str(model_dir / path)
    return str(kind), path


def feat_params(config: Mapping[str, Any], generation: str) -> dict[str, Any]:
    """``mel_spectrogram`` keyword arguments: the config's ``feat_extractor`` over upstream's defaults."""
    params = dict(_DEFAULT_FEAT[generation])
    params["sampling_rate"] = int(config.get("sample_rate") or _DEFAULT_SAMPLE_RATE[generation])
    node = config.get("feat_extractor")
    kwargs = getattr(node, "kwargs", None)
    if isinstance(kwargs, Mapping):
        for key in ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size", "fmin", "fmax", "center"):
            if key in kwargs and (kwargs[key] is None or isinstance(kwargs[key], (int, float, bool))):
                params[key] = kwargs[key]
    return params


def load_spk2info(path: str | Path) -> dict[str, dict[str, Any]]:
    """``spk2info.pt`` as plain dicts of tensors (``weights_only=True``); missing file -> empty."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FrontEndError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({first}); it must hold"
                            " only tensors in dicts") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise FrontEndError(f"{path}: expected {{speaker id: {{'embedding': tensor, ...}}}}")
    return {str(k): dict(v) for k, v in data.items()}


def load_wav(wav: str | Path | torch.Tensor | np.ndarray, target_sr: int, source_sr: int = 16000) -> torch.Tensor:
    """Mono float audio (1, N) at ``target_sr``.

    ``wav`` is a file path (any format soundfile reads; channels are averaged, as upstream) or an
    already-loaded waveform at ``source_sr`` (upstream's older ``prompt_speech_16k`` argument).
    """
    if isinstance(wav, (str, Path)):
        import soundfile as sf

        path = Path(wav)
        if not path.is_file():
            raise FrontEndError(f"{path}: prompt audio file not found")
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile.LibsndfileError and friends
            raise FrontEndError(f"{path}: cannot be read as audio ({exc})") from None
        speech = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))[None]
    else:
        speech = torch.as_tensor(wav, dtype=torch.float32)
        if speech.dim() == 1:
            speech = speech[None]
        if speech.dim() != 2:
            raise FrontEndError(f"prompt audio tensor must be (N,) or (channels, N), got {tuple(speech.shape)}")
        speech = speech.mean(dim=0, keepdim=True)
        sr = source_sr
    if speech.shape[1] == 0:
        raise FrontEndError("prompt audio is empty")
    if not torch.isfinite(speech).all():
        raise FrontEndError("prompt audio has NaN or Inf samples")
    if sr != target_sr:
        import torchaudio.functional as AF

        speech = AF.resample(speech, orig_freq=int(sr), new_freq=int(target_sr))
    return speech


# --------------------------------------------------------------------------------------------------
# The front end
# --------------------------------------------------------------------------------------------------


class CosyVoiceFrontEnd:
    """Text and prompt audio -> ``model_input`` dicts for one model directory (see the module docstring).

    ``config`` is the directory's inert config tree (:func:`cosytrain.modeldir.open_model_dir`).
    ``text_tokenizer`` / ``text_tokenizer_path`` override what the directory says (e.g. whisper's
    ``multilingual.tiktoken`` when openai-whisper is not installed).
    ``text_token_limit`` / ``speech_token_limit`` (the LLM's table sizes, when known) turn an id the
    model could not embed into a one-line error instead of an index error deep in the model.
    """

    def __init__(self, model_dir: str | Path, config: Mapping[str, Any], generation: str, *,
                 text_token_limit: int | None = None, speech_token_limit: int | None = None,
                 allowed_special: str = "all", text_tokenizer: str | None = None,
                 text_tokenizer_path: str | None = None) -> None:
        if generation not in TOKEN_RATE:
            raise FrontEndError(f"unknown generation {generation!r}; expected v1, v2 or v3")
        self.model_dir = Path(model_dir)
        self.generation = generation
        self.allowed_special = allowed_special
        self.feat_kwargs = feat_params(config, generation)
        self.sample_rate = int(self.feat_kwargs["sampling_rate"])
        mel_ratio = config.get("token_mel_ratio")
        self.token_mel_ratio = int(mel_ratio) if isinstance(mel_ratio, (int, float)) else (
            None if generation == "v1" else 2)
        kind, path = text_tokenizer_spec(self.model_dir, generation)
        if text_tokenizer is not None and text_tokenizer != kind:
            kind, path = text_tokenizer, None  # the directory's path belongs to its own tokenizer
        self.text_tokenizer_kind = kind
        self.text_tokenizer_path = str(text_tokenizer_path) if text_tokenizer_path is not None else path
        self._tokenizer: Any = None
        self.text_token_limit = text_token_limit
        self.speech_token_limit = speech_token_limit
        self._speech_tokenizer: Any = None
        self._speaker_embedder: Any = None
        self.spk2info = load_spk2info(self.model_dir / SPK2INFO_FILE)

    # ------------------------------------------------------------------ loading on first use
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from cosytrain.data.text_tokenizer import build_text_tokenizer

            try:
                self._tokenizer = build_text_tokenizer(self.text_tokenizer_kind, self.text_tokenizer_path)
            except ValueError as exc:  # DataError / TokenizerUnavailableError
                raise FrontEndError(f"{self.model_dir}: text tokenizer {self.text_tokenizer_kind!r}: {exc}") from None
            if self.text_token_limit is not None and self._tokenizer.vocab_size > self.text_token_limit:
                tok, self._tokenizer = self._tokenizer, None
                raise FrontEndError(
                    f"{self.model_dir}: the {self.text_tokenizer_kind!r} text tokenizer has {tok.vocab_size} ids but"
                    f" the llm embeds {self.text_token_limit}; set \"text_tokenizer\" in {METADATA_FILE} to the"
                    " tokenizer the model was trained with")
        return self._tokenizer

    def _find(self, names: Sequence[str], what: str) -> Path:
        for name in names:
            if (self.model_dir / name).is_file():
                return self.model_dir / name
        raise FrontEndError(f"{self.model_dir}: no {' or '.join(names)}; {what} needs one (copy upstream's file into"
                            " the model directory, or the stand-in that `cosytrain prepare` fits)")

    @property
    def speech_tokenizer(self) -> Any:
        if self._speech_tokenizer is None:
            from cosytrain.data.speech_tokenizer import load_speech_tokenizer

            path = self._find([ONNX_SPEECH_TOKENIZERS[self.generation], BUILTIN_TOKENIZER_FILE], "a prompt's speech tokens")
            try:
                tok = load_speech_tokenizer(path, onnx_batch_size=1)
            except (OSError, ValueError, RuntimeError) as exc:
                raise FrontEndError(f"{path}: cannot be loaded ({exc})") from None
            if int(tok.token_rate) != TOKEN_RATE[self.generation]:
                raise FrontEndError(f"{path}: makes {tok.token_rate} Hz tokens but this model needs"
                                    f" {TOKEN_RATE[self.generation]} Hz")
            codebook = getattr(tok, "codebook_size", None)
            if codebook is not None and self.speech_token_limit is not None and codebook > self.speech_token_limit:
                raise FrontEndError(f"{path}: has {codebook} token ids but the llm knows {self.speech_token_limit};"
                                    " it is not the tokenizer this model was trained with")
            self._speech_tokenizer = tok
        return self._speech_tokenizer

    @property
    def speaker_embedder(self) -> Any:
        if self._speaker_embedder is None:
            from cosytrain.data.speaker_embedding import load_speaker_embedder

            path = self._find([ONNX_CAMPPLUS, BUILTIN_CAMPPLUS_FILE], "a prompt's speaker embedding")
            try:
                self._speaker_embedder = load_speaker_embedder(path, onnx_batch_size=1)
            except (OSError, ValueError, RuntimeError) as exc:
                raise FrontEndError(f"{path}: cannot be loaded ({exc})") from None
        return self._speaker_embedder

    # ------------------------------------------------------------------ pieces
    def text_normalize(self, text: str, split: bool = True, text_frontend: bool = True) -> list[str] | str:
        """:func:`cosytrain.inference.text_normalizer.text_normalize` with this model's text tokenizer."""
        if not isinstance(text, str):
            raise FrontEndError(f"text must be a string, got {type(text).__name__}")
        return text_normalize(text, self.tokenizer.encode, split=split, text_frontend=text_frontend)

    def _extract_text_token(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = list(self.tokenizer.encode(text))
        token = torch.tensor([ids], dtype=torch.int32).reshape(1, len(ids))
        return token, torch.tensor([token.shape[1]], dtype=torch.int32)

    def _prompt_16k(self, prompt_wav: Any) -> torch.Tensor:
        speech = load_wav(prompt_wav, 16000)
        if speech.shape[1] / 16000 > MAX_PROMPT_SECONDS:
            raise FrontEndError(f"prompt audio is {speech.shape[1] / 16000:.1f} s; use at most {MAX_PROMPT_SECONDS} s"
                                " (as upstream)")
        return speech

    def _extract_speech_token(self, prompt_wav: Any) -> tuple[torch.Tensor, torch.Tensor]:
        speech = self._prompt_16k(prompt_wav)
        ids = self.speech_tokenizer.tokenize_batch([speech[0].numpy()])[0]
        if self.speech_token_limit is not None and ids and max(ids) >= self.speech_token_limit:
            raise FrontEndError(f"speech tokenizer gave id {max(ids)} but the llm knows {self.speech_token_limit} ids")
        token = torch.tensor([ids], dtype=torch.int32).reshape(1, len(ids))
        return token, torch.tensor([token.shape[1]], dtype=torch.int32)

    def _extract_spk_embedding(self, prompt_wav: Any) -> torch.Tensor:
        speech = self._prompt_16k(prompt_wav)
        emb = self.speaker_embedder.embed_batch([speech[0].numpy()])[0]
        return torch.tensor([emb], dtype=torch.float32)

    def _extract_speech_feat(self, prompt_wav: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt mel (1, T, num_mels) at the model's sample rate.

        Upstream's newest front end loads the prompt at 24 kHz for every generation; a CosyVoice 1
        model's features are 22.05 kHz, so here the prompt is loaded at the config's sample rate.
        """
        from cosytrain.data.features import mel_spectrogram

        speech = load_wav(prompt_wav, self.sample_rate)
        feat = mel_spectrogram(speech, **self.feat_kwargs).squeeze(0).transpose(0, 1).unsqueeze(0)
        return feat, torch.tensor([feat.shape[1]], dtype=torch.int32)

    def speaker_info(self, spk_id: str) -> dict[str, Any]:
        if spk_id not in self.spk2info:
            known = ", ".join(sorted(self.spk2info)[:10]) or "none"
            raise FrontEndError(f"unknown speaker {spk_id!r}; this model directory has: {known}"
                                + (" ..." if len(self.spk2info) > 10 else ""))
        return self.spk2info[spk_id]

    # ------------------------------------------------------------------ upstream's model inputs
    def frontend_sft(self, tts_text: str, spk_id: str) -> dict[str, Any]:
        info = self.speaker_info(spk_id)
        if "embedding" not in info and "flow_embedding" not in info:
            raise FrontEndError(f"speaker {spk_id!r} in {SPK2INFO_FILE} has no 'embedding'")
        text, text_len = self._extract_text_token(tts_text)
        embedding = info.get("embedding", info.get("flow_embedding"))
        return {"text": text, "text_len": text_len, "llm_embedding": embedding, "flow_embedding": embedding}

    def frontend_zero_shot(self, tts_text: str, prompt_text: str, prompt_wav: Any, resample_rate: int,
                           zero_shot_spk_id: str = "") -> dict[str, Any]:
        text, text_len = self._extract_text_token(tts_text)
        if zero_shot_spk_id:
            model_input = dict(self.speaker_info(zero_shot_spk_id))
            if "prompt_speech_feat" not in model_input:
                raise FrontEndError(f"speaker {zero_shot_spk_id!r} is not a zero-shot speaker (no prompt);"
                                    " use inference_sft for it")
        else:
            if prompt_wav is None:
                raise FrontEndError("zero-shot synthesis needs a prompt wav (or a zero_shot_spk_id)")
            prompt_token, prompt_token_len = self._extract_text_token(prompt_text)
            feat, feat_len = self._extract_speech_feat(prompt_wav)
            speech_token, speech_token_len = self._extract_speech_token(prompt_wav)
            if speech_token.shape[1] == 0:
                raise FrontEndError("the prompt audio is too short to give any speech token")
            if self.token_mel_ratio is not None:
                # v2/v3 flows need exactly token_mel_ratio mel frames per prompt token (upstream forces 2)
                n = min(feat.shape[1] // self.token_mel_ratio, speech_token.shape[1])
                feat, feat_len = feat[:, :self.token_mel_ratio * n], torch.tensor([self.token_mel_ratio * n],
                                                                                    dtype=torch.int32)
                speech_token, speech_token_len = speech_token[:, :n], torch.tensor([n], dtype=torch.int32)
            embedding = self._extract_spk_embedding(prompt_wav)
            model_input = {
                "prompt_text": prompt_token, "prompt_text_len": prompt_token_len,
                "llm_prompt_speech_token": speech_token, "llm_prompt_speech_token_len": speech_token_len,
                "flow_prompt_speech_token": speech_token, "flow_prompt_speech_token_len": speech_token_len,
                "prompt_speech_feat": feat, "prompt_speech_feat_len": feat_len,
                "llm_embedding": embedding, "flow_embedding": embedding,
            }
        model_input["text"], model_input["text_len"] = text, text_len
        return model_input

    def frontend_cross_lingual(self, tts_text: str, prompt_wav: Any, resample_rate: int,
                               zero_shot_spk_id: str = "") -> dict[str, Any]:
        model_input = self.frontend_zero_shot(tts_text, "", prompt_wav, resample_rate, zero_shot_spk_id)
        # the prompt's text and tokens are kept out of the LLM: only the voice is wanted
        for key in ("prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len"):
            model_input.pop(key, None)
        return model_input

    def frontend_instruct(self, tts_text: str, spk_id: str, instruct_text: str) -> dict[str, Any]:
        model_input = self.frontend_sft(tts_text, spk_id)
        # upstream: the LLM gets no speaker vector in instruct mode (it would leak the speaker's style)
        del model_input["llm_embedding"]
        model_input["prompt_text"], model_input["prompt_text_len"] = self._extract_text_token(instruct_text)
        return model_input

    def frontend_instruct2(self, tts_text: str, instruct_text: str, prompt_wav: Any, resample_rate: int,
                           zero_shot_spk_id: str = "") -> dict[str, Any]:
        model_input = self.frontend_zero_shot(tts_text, instruct_text, prompt_wav, resample_rate, zero_shot_spk_id)
        if zero_shot_spk_id:  # a stored speaker's prompt text is replaced by the instruction
            model_input["prompt_text"], model_input["prompt_text_len"] = self._extract_text_token(instruct_text)
        model_input.pop("llm_prompt_speech_token", None)
        model_input.pop("llm_prompt_speech_token_len", None)
        return model_input

    def frontend_vc(self, source_wav: Any, prompt_wav: Any, resample_rate: int) -> dict[str, Any]:
        prompt_token, prompt_token_len = self._extract_speech_token(prompt_wav)
        feat, feat_len = self._extract_speech_feat(prompt_wav)
        if self.token_mel_ratio is not None:
            n = min(feat.shape[1] // self.token_mel_ratio, prompt_token.shape[1])
            feat, feat_len = feat[:, :self.token_mel_ratio * n], torch.tensor([self.token_mel_ratio * n],
                                                                                dtype=torch.int32)
            prompt_token, prompt_token_len = prompt_token[:, :n], torch.tensor([n], dtype=torch.int32)
        embedding = self._extract_spk_embedding(prompt_wav)
        source_token, source_token_len = self._extract_speech_token(source_wav)
        return {"source_speech_token": source_token, "source_speech_token_len": source_token_len,
                "flow_prompt_speech_token": prompt_token, "flow_prompt_speech_token_len": prompt_token_len,
                "prompt_speech_feat": feat, "prompt_speech_feat_len": feat_len, "flow_embedding": embedding}


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A RuntimeWarning the first time ``message`` comes up in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
