"""The FP16 gate in speech terms: does the audio a user would hear change when the model is served in FP16?

The per-stage FP16 check (:mod:`cosytrain.evaluation.fp16_check`) compares logits, mels and vocoder
waveforms stage by stage. This adds the end-to-end view, as served: the utterances' speech tokens
go through the inference class (:class:`cosytrain.inference.model.CosyVoiceModel` and v2/v3, their
voice-conversion path: flow -> vocoder, no LLM sampling to make the runs diverge) once in FP32 and
once with ``fp16=True`` (FP16 autocast around the flow, vocoder FP32, upstream's serving mode; on a
CPU with ``force_fp16``), from the same seed. Figures, stage ``speech``:

* ``nonfinite`` / ``nonfinite_fp32``: NaN/inf samples in the FP16 / FP32 audio;
* ``mcd_db``: frame-by-frame mel-cepstral distortion FP16 vs FP32 audio (same timing, so no DTW;
  :func:`cosytrain.evaluation.metrics.mel_cepstral_distortion`), mean over utterances;
* ``sim`` / ``sim_min``: speaker similarity of the FP16 audio to the FP32 audio (1 = same voice);
* with an ASR backend and the batches' ``text``: ``wer_fp32``, ``wer_fp16`` and ``wer_delta``.

Default bounds (:data:`cosytrain.evaluation.fp16_check.DEFAULT_TOLERANCES`): ``speech/sim`` >= 0.95,
``speech/nonfinite`` = 0; the MCD and WER figures are reported for the model card, not bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["check_speech"]


def _utterances(batches: Sequence[Mapping[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(speech_token (1, N), embedding (1, D), text) per utterance of the padded batches."""
    out = []
    for batch in batches:
        if not isinstance(batch.get("speech_token"), torch.Tensor) or not isinstance(batch.get("embedding"),
                                                                                       torch.Tensor):
            continue
        texts = batch.get("text") or []
        for i in range(batch["speech_token"].shape[0]):
            n = int(batch["speech_token_len"][i]) if "speech_token_len" in batch else batch["speech_token"].shape[1]
            out.append((batch["speech_token"][i:i + 1, :n], batch["embedding"][i:i + 1].float(),
                        str(texts[i]) if i < len(texts) else ""))
    return out


def check_speech(flow: nn.Module, vocoder: nn.Module, batches: Sequence[Mapping[str, Any]], *, seed: int = 1234,
                 encoder: Any = None, asr: Any = None, llm: Optional[nn.Module] = None) -> dict[str, Any]:
    """FP32 vs FP16 audio of the batches' utterances; the figures of the module docstring."""
    from cosytrain.evaluation import metrics as M
    from cosytrain.evaluation.asr import error_rates
    from cosytrain.evaluation.speaker_similarity import cosine, to_16k
    from cosytrain.evaluation.synthesis import _model, _tts, generation_of, preserved_state

    utts = _utterances(batches)
    if not utts:
        raise ValueError("no utterance with speech_token and embedding to synthesise")
    device = next(flow.parameters()).device
    generation = generation_of(llm, flow)
    rate = int(getattr(vocoder, "sampling_rate", 22050))
    figures: dict[str, Any] = {"nonfinite": 0, "nonfinite_fp32": 0}
    mcds, sims, wers32, wers16 = [], [], [], []
    with preserved_state([flow, vocoder]), torch.no_grad():
        fp32 = _model(generation, None, flow, vocoder, device)
        fp16 = type(fp32)(nn.Module(), flow, vocoder, True, device=device, force_fp16=True)
        for k, (tokens, emb, text) in enumerate(utts):
            wavs = []
            for model in (fp32, fp16):
                torch.manual_seed(seed + k)
                wavs.append(_tts(model, source_speech_token=tokens.to(torch.int32), flow_embedding=emb.to(device)))
            w32, w16 = wavs
            figures["nonfinite"] += M.count_nonfinite(w16)
            figures["nonfinite_fp32"] += M.count_nonfinite(w32)
            if not (torch.isfinite(w16).all() and torch.isfinite(w32).all()) or w16.shape != w32.shape:
                mcds.append(math.nan)
                continue
            mcds.append(M.mel_cepstral_distortion(w32, w16, rate))
            a16, a32 = to_16k(w16, rate), to_16k(w32, rate)
            if encoder is not None:
                sims.append(cosine(encoder.embed(a32), encoder.embed(a16)))
            if asr is not None and text:
                wers32.append(error_rates(text, asr.transcribe(a32))["wer"])
                wers16.append(error_rates(text, asr.transcribe(a16))["wer"])
    figures["mcd_db"] = float(sum(mcds) / len(mcds))  # NaN when any utterance was not finite
    if sims:
        figures["sim"], figures["sim_min"] = float(sum(sims) / len(sims)), float(min(sims))
    elif encoder is not None:
        figures["sim"] = math.nan
    if wers32:
        figures["wer_fp32"] = float(sum(wers32) / len(wers32))
        figures["wer_fp16"] = float(sum(wers16) / len(wers16))
        figures["wer_delta"] = figures["wer_fp16"] - figures["wer_fp32"]
    figures.update(utterances=len(utts), sample_rate=rate, generation=generation)
    return figures
