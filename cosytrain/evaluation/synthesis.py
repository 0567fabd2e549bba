"""Synthesise held-out utterances with the current weights and measure them against their recordings.

Four conditions per utterance, each a question about one stage:

* ``vocoder_gt``: the vocoder on the recording's own mel. The floor: no later stage can beat it.
* ``flow_gt``: the flow on the recording's speech tokens (no prompt), then the vocoder. What the flow
  adds to the floor.
* ``full``: text -> LLM -> flow -> vocoder with the utterance's speaker embedding (upstream's ``sft``
  mode). What a user hears.
* ``zero_shot``: as ``full``, with another utterance of the same speaker as the prompt (its text,
  speech tokens, mel and embedding; upstream's ``zero_shot`` mode).

The token-to-waveform work goes through the inference classes themselves
(:class:`cosytrain.inference.model.CosyVoiceModel` / ``CosyVoice2Model`` / ``CosyVoice3Model``
``tts``; ``flow_gt`` is their voice-conversion path, speech tokens given and the LLM skipped), so
what is measured is what ``synthesize`` produces. Every utterance and condition starts from its own
fixed seed; the caller's RNG states and the modules' train/eval flags are restored afterwards.

Figures (:func:`score`): :func:`cosytrain.evaluation.speech_metrics.speech_distances` (DTW mel-cepstral
distortion, log-F0 RMSE, voicing error, duration ratio), ``sim`` (speaker similarity to the recording,
:mod:`cosytrain.evaluation.speaker_similarity`) and ``wer``/``cer`` when an ASR backend is given
(:mod:`cosytrain.evaluation.asr`), plus ``nonfinite`` (1 when the synthesis has NaN/inf samples).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["CONDITIONS", "SynthesisItem", "SynthesisResult", "generation_of", "synthesize_items", "score",
           "average", "HIGHER_IS_BETTER"]

CONDITIONS = ("vocoder_gt", "flow_gt", "full", "zero_shot")
#: figures where larger is better (ModelCheckpoint/EarlyStopping mode "max"); all others are "min"
HIGHER_IS_BETTER = frozenset({"sim"})


@dataclass
class SynthesisItem:
    """One held-out utterance in the training layout (batch of one) and its recording."""

    utt: str
    spk: str
    text: str
    text_token: torch.Tensor  # (1, T) int
    speech_token: torch.Tensor  # (1, N) int
    speech_feat: torch.Tensor  # (1, F, n_mels) log-mel
    embedding: torch.Tensor  # (1, D)
    wav: torch.Tensor  # (L,) recording at ``sample_rate``
    sample_rate: int
    prompt: Optional["SynthesisItem"] = None  # another utterance of the same speaker (zero-shot)


@dataclass
class SynthesisResult:
    """The waveforms (CPU float, at ``sample_rate``) and mels per condition for one utterance."""

    item: SynthesisItem
    sample_rate: int
    wavs: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def generation_of(llm: Optional[nn.Module], flow: Optional[nn.Module]) -> str:
    """'v1', 'v2' or 'v3' from the part classes (the flow decides; the LLM when there is no flow)."""
    if flow is not None:
        name = type(flow).__name__
        if name == "CausalMaskedDiffWithDiT":
            return "v3"
        if name == "CausalMaskedDiffWithXvec":
            return "v2"
        return "v1"
    name = type(llm).__name__ if llm is not None else ""
    return {"CosyVoice3LM": "v3", "Qwen2LM": "v2"}.get(name, "v1")


@contextlib.contextmanager
def preserved_state(modules: Sequence[nn.Module]) -> Iterator[None]:
    """RNG states (python, numpy, torch CPU + initialised CUDA) and every submodule's train flag restored."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            for m, flag in saved:
                m.training = flag


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model(generation: str, llm: Optional[nn.Module], flow: nn.Module, vocoder: nn.Module,
           device: torch.device) -> Any:
    from cosytrain.inference import model as inference_model

    cls = {"v1": inference_model.CosyVoiceModel, "v2": inference_model.CosyVoice2Model,
           "v3": inference_model.CosyVoice3Model}[generation]
    # the voice-conversion path never calls the LLM, so a placeholder module stands in without one
    return cls(llm if llm is not None else nn.Module(), flow, vocoder, device=device)


def _tts(model: Any, **inputs: Any) -> torch.Tensor:
    chunks = [out["tts_speech"] for out in model.tts(stream=False, **inputs)]
    return torch.cat(chunks, dim=1)[0].float().cpu()


def _vocode(vocoder: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """Vocoder on a (1, n_mels, T) mel; v1/v2 HiFT and Griffin-Lim take ``cache_source``, v3's causal HiFT ``finalize``."""
    import inspect

    params = inspect.signature(vocoder.inference).parameters
    kwargs = {"finalize": True} if "finalize" in params and "cache_source" not in params else {}
    speech, _ = vocoder.inference(speech_feat=mel, **kwargs)
    return speech[0].float().cpu()


def synthesize_items(items: Sequence[SynthesisItem], *, vocoder: nn.Module, llm: Optional[nn.Module] = None,
                     flow: Optional[nn.Module] = None, conditions: Sequence[str] = CONDITIONS, seed: int = 1986,
                     device: Optional[torch.device] = None) -> list[SynthesisResult]:
    """Run every available condition for every item (a condition whose part is missing is left out).

    A condition that raises is recorded in ``result.errors`` (the run goes on): a half-trained LLM
    that never emits end-of-speech, for instance, is a finding, not a crash.
    """
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown synthesis conditions {unknown}; choose from {list(CONDITIONS)}")
    if device is None:
        device = next(iter(p.device for m in (flow, llm, vocoder) if m is not None for p in m.parameters()),
                      torch.device("cpu"))
    modules = [m for m in (llm, flow, vocoder) if m is not None]
    generation = generation_of(llm, flow)
    results: list[SynthesisResult] = []
    rate = int(getattr(vocoder, "sampling_rate", 22050))
    with preserved_state(modules), torch.no_grad():
        model = _model(generation, llm, flow, vocoder, device) if flow is not None else None
        for index, item in enumerate(items):
            result = SynthesisResult(item=item, sample_rate=rate)
            for k, condition in enumerate(conditions):
                if condition in ("flow_gt", "full", "zero_shot") and model is None:
                    continue
                if condition in ("full", "zero_shot") and llm is None:
                    continue
                if condition == "zero_shot" and item.prompt is None:
                    continue
                _seed(seed + 1000 * index + k)
                start = time.perf_counter()
                try:
                    result.wavs[condition] = _run(condition, item, model, vocoder, device)
                except Exception as exc:  # noqa: BLE001 - recorded, reported, the others go on
                    result.errors[condition] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                result.seconds[condition] = time.perf_counter() - start
            results.append(result)
    return results


def _run(condition: str, item: SynthesisItem, model: Any, vocoder: nn.Module, device: torch.device) -> torch.Tensor:
    emb = item.embedding.to(device).float()
    if condition == "vocoder_gt":
        return _vocode(vocoder, item.speech_feat.transpose(1, 2).to(device).float())
    if condition == "flow_gt":
        return _tts(model, source_speech_token=item.speech_token.to(torch.int32), flow_embedding=emb)
    if condition == "full":
        return _tts(model, text=item.text_token.to(torch.int32), llm_embedding=emb, flow_embedding=emb)
    prompt = item.prompt
    assert prompt is not None
    prompt_emb = prompt.embedding.to(device).float()
    feat, tokens = prompt.speech_feat, prompt.speech_token
    if getattr(model, "token_mel_ratio", None):  # v2/v3: the prompt mel is exactly ratio x tokens (upstream)
        n = min(feat.shape[1] // model.token_mel_ratio, tokens.shape[1])
        feat, tokens = feat[:, :n * model.token_mel_ratio], tokens[:, :n]
    return _tts(model, text=item.text_token.to(torch.int32), prompt_text=prompt.text_token.to(torch.int32),
                llm_prompt_speech_token=tokens.to(torch.int32), flow_prompt_speech_token=tokens.to(torch.int32),
                prompt_speech_feat=feat.float(), llm_embedding=prompt_emb, flow_embedding=prompt_emb)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    if orig == new:
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, orig, new)


def score(results: Sequence[SynthesisResult], speaker_encoder: Any = None, asr: Any = None,
          n_fft: int = 1024, hop: int = 256) -> list[dict[str, dict[str, float]]]:
    """Per utterance: condition -> figures (see the module docstring); ``recording`` holds the ASR floor."""
    from cosytrain.evaluation.asr import error_rates
    from cosytrain.evaluation.speaker_similarity import cosine, to_16k
    from cosytrain.evaluation.speech_metrics import speech_distances

    out: list[dict[str, dict[str, float]]] = []
    for result in results:
        item = result.item
        ref = _resample(item.wav.float().reshape(-1), item.sample_rate, result.sample_rate)
        ref16 = to_16k(ref, result.sample_rate)
        ref_emb = speaker_encoder.embed(ref16) if speaker_encoder is not None else None
        figures: dict[str, dict[str, float]] = {}
        if asr is not None:
            figures["recording"] = error_rates(item.text, asr.transcribe(ref16))
        for condition, wav in result.wavs.items():
            finite = bool(torch.isfinite(wav).all()) and wav.numel() > 0
            row = {"nonfinite": 0.0 if finite else 1.0}
            row.update(speech_distances(ref, wav, result.sample_rate, n_fft=n_fft, hop=hop))
            if finite:
                wav16 = to_16k(wav, result.sample_rate)
                if ref_emb is not None:
                    row["sim"] = cosine(ref_emb, speaker_encoder.embed(wav16))
                if asr is not None:
                    row.update(error_rates(item.text, asr.transcribe(wav16)))
            figures[condition] = row
        out.append(figures)
    return out


def average(per_utt: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every figure over the utterances that have it (NaN figures are left out, and counted)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for figures in per_utt:
        for condition, row in figures.items():
            for name, value in row.items():
                sums.setdefault(condition, {}).setdefault(name, []).append(value)
    out: dict[str, dict[str, float]] = {}
    for condition, rows in sums.items():
        out[condition] = {}
        for name, values in rows.items():
            finite = [v for v in values if math.isfinite(v)]
            out[condition][name] = float(np.mean(finite)) if finite else float("nan")
        out[condition]["count"] = float(max(len(v) for v in rows.values()))
    return out
