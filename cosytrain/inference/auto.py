"""The user-facing inference API: ``AutoModel``, ``CosyVoice``, ``CosyVoice2``, ``CosyVoice3``.

Same names, arguments and outputs as upstream ``cosyvoice/cli/cosyvoice.py``, so a script written
for upstream runs here by changing its import::

    from cosytrain.inference.auto import AutoModel
    model = AutoModel(model_dir="pretrained_models/CosyVoice-300M-SFT")
    for chunk in model.inference_sft("Hello there.", model.list_available_spks()[0]):
        chunk["tts_speech"]  # (1, N) float tensor at model.sample_rate

Each ``inference_*`` method is a generator yielding ``{'tts_speech': (1, N) CPU tensor}``: one item
per text piece (long text is split into sentences), or one per streamed chunk with ``stream=True``.

Differences from upstream, on purpose:

* The model directory is read safely (:mod:`cosytrain.modeldir`): the yaml is never executed and
  every weight file is loaded with ``weights_only=True``. Nothing is downloaded: a model id that is
  not a local directory is an error (fetch it first, e.g. with modelscope's ``snapshot_download``).
* ``load_jit``, ``load_trt``, ``load_vllm`` and ``trt_concurrent`` are accepted and ignored with a
  warning (cosytrain runs the PyTorch modules only).
* ``fp16=True`` follows :class:`cosytrain.inference.model.CosyVoiceModel` (FP16 autocast on a GPU;
  on a CPU it warns and runs FP32, as upstream turns fp16 off without CUDA).
* ``device=`` (keyword) picks the device; upstream always uses CUDA when present.
  ``text_tokenizer=`` / ``text_tokenizer_path=`` (keywords) override the directory's text tokenizer
  (see :mod:`cosytrain.inference.frontend`), e.g. whisper's ``multilingual.tiktoken`` for a
  CosyVoice 1 model when openai-whisper is not installed.
* Prompts (``prompt_wav``) are file paths, as upstream's current API, or a waveform tensor at 16 kHz
  (upstream's older ``prompt_speech_16k``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch

from cosytrain.inference.frontend import CosyVoiceFrontEnd, FrontEndError, warn_once
from cosytrain.modeldir import (
    CONFIG_GENERATION,
    GENERATION_NAMES,
    ModelDirError,
    ModelDirectory,
    find_config,
    open_model_dir,
)

__all__ = ["AutoModel", "CosyVoice", "CosyVoice2", "CosyVoice3", "model_class_for"]

logger = logging.getLogger(__name__)
Output = Generator[dict[str, torch.Tensor], None, None]


def _text_table_size(llm: torch.nn.Module) -> int | None:
    """Rows of the LLM's text embedding: v1's ``text_embedding``, v2/v3's Qwen input embedding."""
    table = getattr(llm, "text_embedding", None)
    if table is None:
        qwen = getattr(getattr(llm, "llm", None), "model", None)
        table = qwen.get_input_embeddings() if hasattr(qwen, "get_input_embeddings") else None
    size = getattr(table, "num_embeddings", None)
    return int(size) if size is not None else None


def _model_class(generation: str) -> Callable[..., Any]:
    """The token-level (streaming) model class of a generation."""
    from cosytrain.inference import model as model_module

    name = {"v1": "CosyVoiceModel", "v2": "CosyVoice2Model", "v3": "CosyVoice3Model"}[generation]
    return getattr(model_module, name)


def _build_model(generation: str, parts: dict[str, torch.nn.Module], fp16: bool, **options: Any) -> Any:
    """``Model(llm, flow, hift, fp16, **options)``, passing only the keyword options the class takes."""
    import inspect

    cls = _model_class(generation)
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        options = {k: v for k, v in options.items() if k in accepted}
    return cls(parts["llm"], parts["flow"], parts["hift"], fp16, **options)


class CosyVoice:
    """CosyVoice 1 (``cosyvoice.yaml``): sft, zero-shot, cross-lingual, instruct and voice conversion."""

    generation = "v1"

    def __init__(self, model_dir: str | Path, load_jit: bool = False, load_trt: bool = False, fp16: bool = False,
                 trt_concurrent: int = 1, *, load_vllm: bool = False, device: str | torch.device | None = None,
                 force_fp16: bool = False, text_tokenizer: str | None = None,
                 text_tokenizer_path: str | Path | None = None) -> None:
        for flag, value in (("load_jit", load_jit), ("load_trt", load_trt), ("load_vllm", load_vllm)):
            if value:
                warn_once(f"{flag}=True is ignored: cosytrain runs the PyTorch modules only")
        self.model_dir = str(model_dir)
        self.fp16 = fp16
        self.instruct = "-Instruct" in self.model_dir  # upstream's (name-based) hint, informative only
        directory = _open(model_dir)
        if directory.generation != self.generation:
            right = _CLASSES[directory.generation].__name__
            raise ModelDirError(
                f"{directory.config_path}: a {GENERATION_NAMES[directory.generation]} model directory; load it with"
                f" {right} or AutoModel, not {type(self).__name__}")
        self.config_path = directory.config_path
        parts = directory.load(device="cpu")  # ``directory`` (with its cached state dicts) is dropped after this
        self.model = _build_model(self.generation, parts, fp16, device=device, force_fp16=force_fp16)
        llm = parts["llm"]
        self.frontend = CosyVoiceFrontEnd(directory.path, directory.config, self.generation,
                                          text_token_limit=_text_table_size(llm),
                                          speech_token_limit=getattr(llm, "speech_token_size", None),
                                          allowed_special=str(directory.config.get("allowed_special", "all")),
                                          text_tokenizer=text_tokenizer,
                                          text_tokenizer_path=None if text_tokenizer_path is None
                                          else str(text_tokenizer_path))
        rate = directory.config.get("sample_rate")
        self.sample_rate = int(rate) if isinstance(rate, (int, float)) else int(self.model.sample_rate)

    # ------------------------------------------------------------------ speakers
    def list_available_spks(self) -> list[str]:
        return list(self.frontend.spk2info.keys())

    def add_zero_shot_spk(self, prompt_text: str, prompt_wav: Any, zero_shot_spk_id: str) -> bool:
        """Keep a prompt's tokens, mel and embedding under ``zero_shot_spk_id`` (for ``zero_shot_spk_id=``)."""
        if not zero_shot_spk_id:
            raise FrontEndError("zero_shot_spk_id must not be empty")
        model_input = self.frontend.frontend_zero_shot("", prompt_text, prompt_wav, self.sample_rate, "")
        del model_input["text"], model_input["text_len"]
        self.frontend.spk2info[zero_shot_spk_id] = model_input
        return True

    def save_spkinfo(self) -> None:
        """Write ``spk2info.pt`` (tensors only, atomically) so the speakers survive a reload."""
        from cosytrain.utils.atomic import atomic_torch_save

        atomic_torch_save(self.frontend.spk2info, Path(self.model_dir) / "spk2info.pt")

    # ------------------------------------------------------------------ synthesis
    def _synthesise(self, tts_text: str, text_frontend: bool, make_input: Callable[[str], dict[str, Any]],
                    stream: bool, speed: float) -> Output:
        for piece in self.frontend.text_normalize(tts_text, split=True, text_frontend=text_frontend):
            model_input = make_input(piece)
            logger.info("synthesis text %s", piece)
            yield from self._run(model_input, stream, speed)

    def _run(self, model_input: dict[str, Any], stream: bool, speed: float) -> Output:
        start = time.time()
        for output in self.model.tts(**model_input, stream=stream, speed=speed):
            seconds = output["tts_speech"].shape[1] / self.sample_rate
            logger.info("yield speech len %.3f s, rtf %.3f", seconds, (time.time() - start) / max(seconds, 1e-9))
            yield output
            start = time.time()

    def inference_sft(self, tts_text: str, spk_id: str, stream: bool = False, speed: float = 1.0,
                      text_frontend: bool = True) -> Output:
        self.frontend.speaker_info(spk_id)  # an unknown speaker fails before any work
        yield from self._synthesise(tts_text, text_frontend, lambda t: self.frontend.frontend_sft(t, spk_id),
                                    stream, speed)

    def inference_zero_shot(self, tts_text: str, prompt_text: str, prompt_wav: Any, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True) -> Output:
        if self.generation == "v3" and "<|endofprompt|>" not in prompt_text + tts_text:
            logger.warning("<|endofprompt|> not found in CosyVoice3 inference, check your input text")
        prompt_text = self.frontend.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
        if zero_shot_spk_id:
            self.frontend.speaker_info(zero_shot_spk_id)
        cached: dict[str, Any] = {}

        def make(piece: str) -> dict[str, Any]:
            if len(piece) < 0.5 * len(prompt_text):
                logger.warning("synthesis text %s too short than prompt text %s, this may lead to bad performance",
                               piece, prompt_text)
            return self._prompted(cached, piece, lambda t: self.frontend.frontend_zero_shot(
                t, prompt_text, prompt_wav, self.sample_rate, zero_shot_spk_id))

        yield from self._synthesise(tts_text, text_frontend, make, stream, speed)

    def _prompted(self, cached: dict[str, Any], piece: str, make: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """The prompt's tokens/mel/embedding are computed for the first piece and reused for the rest
        (upstream recomputes them per piece; the result is the same)."""
        if not cached:
            cached.update(make(piece))
            return dict(cached)
        text, text_len = self.frontend._extract_text_token(piece)
        return {**cached, "text": text, "text_len": text_len}

    def inference_cross_lingual(self, tts_text: str, prompt_wav: Any, zero_shot_spk_id: str = "",
                                stream: bool = False, speed: float = 1.0, text_frontend: bool = True) -> Output:
        if zero_shot_spk_id:
            self.frontend.speaker_info(zero_shot_spk_id)
        cached: dict[str, Any] = {}
        yield from self._synthesise(tts_text, text_frontend, lambda t: self._prompted(
            cached, t, lambda u: self.frontend.frontend_cross_lingual(u, prompt_wav, self.sample_rate,
                                                                      zero_shot_spk_id)), stream, speed)

    def inference_instruct(self, tts_text: str, spk_id: str, instruct_text: str, stream: bool = False,
                           speed: float = 1.0, text_frontend: bool = True) -> Output:
        """CosyVoice 1 instruct (an ``-Instruct`` model): the instruction ends with ``<|endofprompt|>``."""
        if self.generation != "v1":
            raise NotImplementedError(f"inference_instruct is only implemented for CosyVoice; use"
                                      f" inference_instruct2 with {type(self).__name__}")
        self.frontend.speaker_info(spk_id)
        instruct_text = self.frontend.text_normalize(instruct_text, split=False, text_frontend=text_frontend)
        yield from self._synthesise(tts_text, text_frontend,
                                    lambda t: self.frontend.frontend_instruct(t, spk_id, instruct_text), stream, speed)

    def inference_vc(self, source_wav: Any, prompt_wav: Any, stream: bool = False, speed: float = 1.0) -> Output:
        """Voice conversion: the source's speech tokens re-voiced with the prompt's speaker (no LLM)."""
        model_input = self.frontend.frontend_vc(source_wav, prompt_wav, self.sample_rate)
        yield from self._run(model_input, stream, speed)


class CosyVoice2(CosyVoice):
    """CosyVoice 2 (``cosyvoice2.yaml``, Qwen tokenizer from ``CosyVoice-BlankEN``): adds ``inference_instruct2``."""

    generation = "v2"

    def inference_instruct2(self, tts_text: str, instruct_text: str, prompt_wav: Any, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True) -> Output:
        """Instructed synthesis in the prompt's voice; the instruction ends with ``<|endofprompt|>``."""
        if zero_shot_spk_id:
            self.frontend.speaker_info(zero_shot_spk_id)
        cached: dict[str, Any] = {}
        yield from self._synthesise(tts_text, text_frontend, lambda t: self._prompted(
            cached, t, lambda u: self.frontend.frontend_instruct2(u, instruct_text, prompt_wav, self.sample_rate,
                                                                  zero_shot_spk_id)), stream, speed)


class CosyVoice3(CosyVoice2):
    """CosyVoice 3 (``cosyvoice3.yaml``): prompts carry ``...<|endofprompt|>`` (e.g. 'You are a helpful assistant.')."""

    generation = "v3"


_CLASSES: dict[str, type[CosyVoice]] = {"v1": CosyVoice, "v2": CosyVoice2, "v3": CosyVoice3}


def _open(model_dir: str | Path) -> ModelDirectory:
    if not Path(model_dir).is_dir():
        raise ModelDirError(f"{model_dir}: model directory not found; cosytrain does not download models - fetch it"
                            " first (e.g. modelscope snapshot_download) and pass the local folder")
    return open_model_dir(model_dir)


def model_class_for(model_dir: str | Path) -> type[CosyVoice]:
    """The class upstream ``AutoModel`` would use: by the first of cosyvoice.yaml, cosyvoice2.yaml, cosyvoice3.yaml."""
    if not Path(model_dir).is_dir():
        _open(model_dir)
    return _CLASSES[CONFIG_GENERATION[find_config(model_dir).name]]


def AutoModel(model_dir: str | Path | None = None, **kwargs: Any) -> CosyVoice:  # noqa: N802 - upstream's name
    """``CosyVoice``, ``CosyVoice2`` or ``CosyVoice3`` for ``model_dir``, picked as upstream does."""
    if model_dir is None:
        raise TypeError("AutoModel() needs model_dir")
    return model_class_for(model_dir)(model_dir, **kwargs)

