"""The synthesis check an export must pass before it is renamed into place.

The written directory is loaded back strictly through :mod:`cosytrain.modeldir` (see
:mod:`cosytrain.export.writer`) and synthesises one short utterance (byte-tokenised text -> speech
tokens -> mel -> waveform, with the generation's token-level model) with finite numbers; otherwise
the export fails.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from cosytrain.export.errors import ExportError

__all__ = ["CHECK_TEXT", "smoke_test", "smoke_test_v23"]


CHECK_TEXT = "Hello!"


def smoke_test(llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module, max_tokens: int = 25,
               seed: int = 0) -> dict[str, Any]:
    """Synthesise one short utterance on the CPU and raise if anything is not finite.

    Text: ``CHECK_TEXT`` through the built-in byte tokenizer (ids folded into the LLM's vocabulary),
    so no front-end files are needed; the check is about finite numbers, not intelligible speech.
    Also runs one teacher-forced LLM loss. The global RNG state is left as it was.
    """
    from cosytrain.data.text_tokenizer import ByteTokenizer
    from cosytrain.inference.model import CosyVoiceModel

    model = CosyVoiceModel(llm, flow, hift, device="cpu")
    text_vocab = int(llm.text_embedding.num_embeddings)
    speech_vocab = int(llm.speech_token_size)
    ids = [t % text_vocab for t in ByteTokenizer().encode(CHECK_TEXT)]
    text = torch.tensor([ids], dtype=torch.int32)

    def speaker(module: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(1, int(module.spk_embed_affine_layer.in_features)), dim=1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding, flow_embedding = speaker(llm), speaker(flow)
        with torch.inference_mode():
            speech = torch.randint(0, speech_vocab, (1, 20))
            out = llm({"text_token": text.long(), "text_token_len": torch.tensor([text.shape[1]], dtype=torch.int32),
                       "speech_token": speech, "speech_token_len": torch.tensor([20], dtype=torch.int32),
                       "embedding": embedding}, torch.device("cpu"))
        loss = float(out["loss"])
        if not math.isfinite(loss):
            raise ExportError(f"check: the llm's teacher-forced loss is {loss}; the llm weights are broken")
        empty = torch.zeros(1, 0, dtype=torch.int32)
        try:
            tokens = list(itertools.islice(model.speech_tokens(text, empty, empty, embedding), max_tokens))
        except RuntimeError as exc:  # NaN scores make multinomial sampling fail
            raise ExportError(f"check: llm sampling failed ({str(exc).splitlines()[0]})") from None
        if not tokens:
            raise ExportError("check: the llm produced no speech tokens")
        try:
            result = list(model.tts(source_speech_token=torch.tensor([tokens], dtype=torch.int32),
                                    flow_embedding=flow_embedding))
        except (RuntimeError, IndexError, ValueError) as exc:  # e.g. llm tokens outside the flow's vocabulary
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"check: tokens -> mel -> wav failed ({first[:200]}); do the parts fit together?") from None
    wav = result[0]["tts_speech"]
    frames = int(len(tokens) / flow.input_frame_rate * model.sample_rate / model.mel_hop)
    return _checked_waveform(wav, frames, model, len(ids), len(tokens), loss)


def smoke_test_v23(llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module, generation: str,
                   max_tokens: int = 25, seed: int = 0) -> dict[str, Any]:
    """The CosyVoice 2/3 counterpart of :func:`smoke_test` (Qwen2 text table, causal flow, 24 kHz hift).

    Python's and torch's global RNG states are left as they were (the llm's training layout draws
    from python ``random``).
    """
    import random

    from cosytrain.data.text_tokenizer import ByteTokenizer
    from cosytrain.inference.model import CosyVoice2Model, CosyVoice3Model

    model = (CosyVoice3Model if generation == "v3" else CosyVoice2Model)(llm, flow, hift, device="cpu")
    text_vocab = int(llm.llm.model.get_input_embeddings().num_embeddings)
    speech_vocab = int(llm.speech_token_size)
    ids = [t % text_vocab for t in ByteTokenizer().encode(CHECK_TEXT)]
    text = torch.tensor([ids], dtype=torch.int32)
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            embedding = torch.nn.functional.normalize(
                torch.randn(1, int(flow.spk_embed_affine_layer.in_features)), dim=1)
            with torch.inference_mode():
                speech = torch.randint(0, speech_vocab, (1, 20))
                batch = {"text_token": text.long(),
                         "text_token_len": torch.tensor([text.shape[1]], dtype=torch.int32),
                         "speech_token": speech, "speech_token_len": torch.tensor([20], dtype=torch.int32),
                         "embedding": embedding}
                out = llm(batch, torch.device("cpu"))
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise ExportError(f"check: the llm's teacher-forced loss is {loss}; the llm weights are broken")
            empty = torch.zeros(1, 0, dtype=torch.int32)
            try:
                tokens = list(itertools.islice(model.speech_tokens(text, empty, empty, torch.zeros(0, 192)),
                                               max_tokens))
            except RuntimeError as exc:
                raise ExportError(f"check: llm sampling failed ({str(exc).splitlines()[0]})") from None
            if not tokens:
                raise ExportError("check: the llm produced no speech tokens")
            try:
                result = list(model.tts(source_speech_token=torch.tensor([tokens], dtype=torch.int32),
                                        flow_embedding=embedding))
            except (RuntimeError, IndexError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"check: tokens -> mel -> wav failed ({first[:200]}); do the parts fit"
                                  " together?") from None
    finally:
        random.setstate(py_state)
    wav = result[0]["tts_speech"]
    frames = len(tokens) * model.token_mel_ratio
    return _checked_waveform(wav, frames, model, len(ids), len(tokens), loss)


def _checked_waveform(wav: torch.Tensor, frames: int, model: Any, text_tokens: int, speech_tokens: int,
                      loss: float) -> dict[str, Any]:
    """The synthesised waveform must be finite and exactly ``frames`` mel frames long; the check's record."""
    if not bool(torch.isfinite(wav).all()):
        raise ExportError(f"check: the synthesised waveform has {int((~torch.isfinite(wav)).sum())} non-finite"
                          " samples; the flow or hift weights are broken")
    if wav.shape[-1] != frames * model.mel_hop:
        raise ExportError(f"check: expected {frames * model.mel_hop} samples, got {wav.shape[-1]}")
    return {"text": CHECK_TEXT, "text_tokens": text_tokens, "speech_tokens": speech_tokens, "mel_frames": frames,
            "samples": int(wav.shape[-1]), "sample_rate": model.sample_rate, "llm_loss": round(loss, 6),
            "peak": round(float(wav.abs().max()), 6), "finite": True}
