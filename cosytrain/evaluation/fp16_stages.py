"""The three stage comparisons of the FP16 check: each runs its part in FP32 and under FP16 autocast.

* :func:`check_llm`: teacher-forced next-token agreement (logits captured at ``criterion_ce``);
* :func:`check_flow`: ``inference`` mels, the FP32 run's initial ODE noise replayed into the FP16 run;
* :func:`check_hift`: ``inference`` waveforms from the same mels, both runs seeded identically.

Both runs of a stage are seeded the same (:func:`_seed_all`); an exception raised only under FP16
becomes :class:`FP16RunError` (a finding, not a crash). The orchestration, RNG isolation and the
figures are :func:`cosytrain.evaluation.fp16_check.run_fp16_check`'s.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cosytrain.evaluation import metrics as M
from cosytrain.evaluation.fp16_batches import DEFAULT_SEED, _length, _rows

__all__ = ["AutocastSpec", "autocast_spec", "FP16RunError", "check_llm", "check_flow", "check_hift",
           "batch_mels", "module_device"]

IGNORE_ID = -1


# --------------------------------------------------------------------------------------------------
# Precision, RNG and FP16 failures
# --------------------------------------------------------------------------------------------------


@dataclass
class AutocastSpec:
    """Where FP16 autocast runs, and the sentence that goes into the figures."""

    device_type: str
    dtype: torch.dtype = torch.float16

    @property
    def note(self) -> str:
        if self.device_type == "cuda":
            return "CUDA FP16 autocast"
        return (f"{self.device_type.upper()} FP16 autocast (no CUDA device): kernels round differently from"
                " CUDA's, so these figures indicate, not reproduce, GPU FP16 behaviour")

    def fp16(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def fp32(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, enabled=False)


def autocast_spec(device: torch.device | str) -> AutocastSpec:
    """FP16 autocast on the parts' own device type (CUDA when they are there, else CPU)."""
    return AutocastSpec(torch.device(device).type)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # every CUDA device too


class FP16RunError(RuntimeError):
    """The FP16 run raised where the FP32 run of the same input did not: an FP16 failure."""


@contextlib.contextmanager
def _fp16_failure() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any exception here is the finding
        raise FP16RunError(f"raised only under FP16 autocast: {type(exc).__name__}: {exc}") from exc


class _Replay:
    """Replaces ``obj.<name>`` so that calls recorded in the FP32 run return the same tensors in the
    FP16 run (used for the flow's initial noise: identical noise whatever the RNG does in between)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name
        self.mode = "record"
        self.values: list[torch.Tensor] = []
        self.cursor = 0

    def __enter__(self) -> "_Replay":
        self.had_own = self.name in vars(self.obj)
        self.own = vars(self.obj).get(self.name)
        self.original = getattr(self.obj, self.name)
        object.__setattr__(self.obj, self.name, self._call)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.had_own:
            object.__setattr__(self.obj, self.name, self.own)
        else:
            object.__delattr__(self.obj, self.name)

    def record(self) -> None:
        self.mode, self.values, self.cursor = "record", [], 0

    def replay(self) -> None:
        self.mode, self.cursor = "replay", 0

    def _call(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mode == "record":
            out = self.original(*args, **kwargs)
            self.values.append(out.detach().clone())
            return out
        if self.cursor >= len(self.values):
            raise RuntimeError(f"{self.name} was called more often in the FP16 run than in the FP32 run")
        value = self.values[self.cursor]
        self.cursor += 1
        return value.clone()


def module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _vocab_of(module: nn.Module, *names: str) -> Optional[int]:
    """``num_embeddings`` of the first embedding found at the dotted ``names`` (None if none is)."""
    for name in names:
        obj: Any = module
        for attr in name.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Embedding):
            return int(obj.num_embeddings)
    return None


def _check_tokens(batches: Sequence[Mapping[str, Any]], key: str, vocab: Optional[int], what: str) -> None:
    """A clear error instead of an embedding IndexError when data and model do not match."""
    if vocab is None:
        return
    for batch, i in _rows(batches):
        if not isinstance(batch.get(key), torch.Tensor):
            continue
        tokens = batch[key][i, :_length(batch, key, i)]
        if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            raise ValueError(f"{key} holds ids up to {int(tokens.max())} but the {what} has {vocab}; the data"
                             " was tokenised for another model (check the text tokenizer / speech codebook)")


def _llm_logits(llm: nn.Module, batch: Mapping[str, Any], device: torch.device, seed: int,
                precision: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V) float32 as produced, targets (B, T)) captured at the criterion's input."""
    criterion = getattr(llm, "criterion_ce", None)
    if not isinstance(criterion, nn.Module):
        raise TypeError(f"{type(llm).__name__} has no criterion_ce module; the LLM check reads the teacher-forced"
                        " logits at its input (upstream LLMs all have one)")
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        captured.append((args[0].detach().float(), args[1].detach()))

    handle = criterion.register_forward_pre_hook(grab)
    try:
        _seed_all(seed)  # Qwen2LM draws its uni/bistream layout from python random
        with precision, torch.no_grad():
            llm(batch, device)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(llm).__name__}.forward did not call criterion_ce; cannot read its logits")
    return captured[-1]


def check_llm(llm: nn.Module, batches: Sequence[Mapping[str, Any]], spec: AutocastSpec,
              seed: int = DEFAULT_SEED) -> dict[str, float]:
    """Teacher-forced next-token agreement of FP16 autocast with FP32 over the batches."""
    device = module_device(llm)
    _check_tokens(batches, "text_token", _vocab_of(llm, "text_embedding", "llm.model.model.embed_tokens"),
                  "llm's text vocabulary")
    _check_tokens(batches, "speech_token", _vocab_of(llm, "speech_embedding"), "llm's speech vocabulary")
    refs, tests = [], []
    for batch in batches:
        logits32, target = _llm_logits(llm, batch, device, seed, spec.fp32())
        with _fp16_failure():
            logits16, target16 = _llm_logits(llm, batch, device, seed, spec.fp16())
        if not torch.equal(target, target16):
            raise RuntimeError("the LLM's targets differ between the FP32 and FP16 runs (unseeded randomness?)")
        mask = (target != IGNORE_ID).reshape(-1)
        refs.append(logits32.reshape(-1, logits32.shape[-1])[mask])
        tests.append(logits16.reshape(-1, logits16.shape[-1])[mask])
    ref, test = torch.cat(refs), torch.cat(tests)
    kl = M.kl_divergence(ref, test)
    return {
        "top1_agreement": M.top1_agreement(ref, test),
        "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
        "kl_max": float(kl.max()) if kl.numel() else 0.0,
        "nonfinite": M.count_nonfinite(test),
        "nonfinite_fp32": M.count_nonfinite(ref),
        "positions": int(ref.shape[0]),
    }


def _flow_inputs(flow: nn.Module, batch: Mapping[str, Any], i: int, device: torch.device) -> dict[str, Any]:
    """Inference arguments for row ``i``: first third of the utterance as prompt when mels are given."""
    n = _length(batch, "speech_token", i)
    token = batch["speech_token"][i, :n].reshape(1, -1).to(device)
    n_mels = int(getattr(flow, "output_size", 80))
    n_prompt, prompt_feat = 0, torch.zeros(1, 0, n_mels)
    if isinstance(batch.get("speech_feat"), torch.Tensor) and n >= 6:
        feat = batch["speech_feat"][i, :_length(batch, "speech_feat", i)]
        n_prompt = n // 3
        ratio = getattr(flow, "token_mel_ratio", None)
        frames = n_prompt * int(ratio) if ratio else max(1, round(n_prompt * feat.shape[0] / n))
        if frames <= feat.shape[0] and feat.shape[-1] == n_mels:
            prompt_feat = feat[:frames].reshape(1, frames, n_mels)
        else:
            n_prompt = 0
    args = {
        "token": token[:, n_prompt:],
        "token_len": torch.tensor([n - n_prompt], dtype=torch.int32, device=device),
        "prompt_token": token[:, :n_prompt],
        "prompt_token_len": torch.tensor([n_prompt], dtype=torch.int32, device=device),
        "prompt_feat": prompt_feat.float().to(device),
        "prompt_feat_len": torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=device),
        "embedding": batch["embedding"][i:i + 1].float().to(device),
        "flow_cache": torch.zeros(1, n_mels, 0, 2, device=device),
        "streaming": False,
        "finalize": True,
    }
    params = inspect.signature(flow.inference).parameters
    return {k: v for k, v in args.items() if k in params}


def check_flow(flow: nn.Module, batches: Sequence[Mapping[str, Any]], spec: AutocastSpec,
               seed: int = DEFAULT_SEED) -> tuple[dict[str, float], list[torch.Tensor], list[torch.Tensor]]:
    """Mel agreement per utterance; returns the figures and the FP32 and FP16 mels (1, 80, T)."""
    if not hasattr(flow, "inference"):
        raise TypeError(f"{type(flow).__name__} has no inference(); the flow check synthesises mels with it")
    device = module_device(flow)
    _check_tokens(batches, "speech_token", _vocab_of(flow, "input_embedding"), "flow's speech vocabulary")
    decoder = getattr(flow, "decoder", None)
    replay_noise = decoder is not None and callable(getattr(decoder, "initial_noise", None))
    mels32: list[torch.Tensor] = []
    mels16: list[torch.Tensor] = []
    l1s, coss, maxes, weights = [], [], [], []
    bad16 = bad32 = 0
    for batch, i in _rows(batches):
        if not isinstance(batch.get("embedding"), torch.Tensor):
            raise KeyError("the flow check needs 'embedding' (speaker x-vectors) in the batch")
        args = _flow_inputs(flow, batch, i, device)
        replay = _Replay(decoder, "initial_noise") if replay_noise else contextlib.nullcontext()
        with replay:
            if replay_noise:
                replay.record()
            _seed_all(seed + i)
            with spec.fp32():
                mel32 = flow.inference(**args)[0].float()
            if replay_noise:
                replay.replay()
            _seed_all(seed + i)
            with _fp16_failure(), spec.fp16():
                mel16 = flow.inference(**args)[0].float()
        bad16 += M.count_nonfinite(mel16)
        bad32 += M.count_nonfinite(mel32)
        l1s.append(M.mel_l1(mel32, mel16))
        coss.append(M.cosine_similarity(mel32, mel16))
        maxes.append(float((mel32.double() - mel16.double()).abs().max()) if mel32.numel() else 0.0)
        weights.append(mel32.shape[-1])
        mels32.append(mel32.detach())
        mels16.append(mel16.detach())
    total = max(sum(weights), 1)
    figures = {
        "mel_l1": sum(v * w for v, w in zip(l1s, weights)) / total,
        "mel_max_abs": max(maxes) if maxes else 0.0,
        "cosine": sum(coss) / max(len(coss), 1),
        "cosine_min": min(coss) if coss else 1.0,
        "nonfinite": bad16,
        "nonfinite_fp32": bad32,
        "frames": int(sum(weights)),
    }
    return figures, mels32, mels16


def check_hift(hift: nn.Module, mels: Sequence[torch.Tensor], spec: AutocastSpec,
               seed: int = DEFAULT_SEED) -> tuple[dict[str, float], list[torch.Tensor], list[torch.Tensor]]:
    """Waveform agreement per mel (1, n_mels, T); returns figures and the FP32/FP16 waveforms (L,)."""
    if not hasattr(hift, "inference"):
        raise TypeError(f"{type(hift).__name__} has no inference(); the vocoder check synthesises with it")
    device = module_device(hift)
    rate = int(getattr(hift, "sampling_rate", 22050))
    wavs32: list[torch.Tensor] = []
    wavs16: list[torch.Tensor] = []
    lsds, mcds, maxes, src, weights = [], [], [], [], []
    bad16 = bad32 = 0
    for k, mel in enumerate(mels):
        mel = mel.float().to(device)
        _seed_all(seed + k)
        with spec.fp32():
            wav32, s32 = hift.inference(mel)
        _seed_all(seed + k)
        with _fp16_failure(), spec.fp16():
            wav16, s16 = hift.inference(mel)
        wav32, wav16 = wav32.float().reshape(-1), wav16.float().reshape(-1)
        bad16 += M.count_nonfinite(wav16)
        bad32 += M.count_nonfinite(wav32)
        lsds.append(M.log_spectral_distance(wav32, wav16))
        mcds.append(M.mel_cepstral_distortion(wav32, wav16, rate))
        maxes.append(float((wav32.double() - wav16.double()).abs().max()))
        src.append(float((s32.double() - s16.double()).abs().max()) if s32.shape == s16.shape else math.inf)
        weights.append(wav32.numel())
        wavs32.append(wav32.detach().cpu())
        wavs16.append(wav16.detach().cpu())
    total = max(sum(weights), 1)
    figures = {
        "lsd_db": sum(v * w for v, w in zip(lsds, weights)) / total,
        "mcd_db": sum(v * w for v, w in zip(mcds, weights)) / total,
        "wav_max_abs": max(maxes) if maxes else 0.0,
        "source_max_abs_diff": max(src) if src else 0.0,
        "nonfinite": bad16,
        "nonfinite_fp32": bad32,
        "samples": int(sum(weights)),
        "sample_rate": rate,
    }
    return figures, wavs32, wavs16


def batch_mels(batches: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    mels = []
    for batch, i in _rows(batches):
        if isinstance(batch.get("speech_feat"), torch.Tensor):
            feat = batch["speech_feat"][i, :_length(batch, "speech_feat", i)]
            mels.append(feat.t().unsqueeze(0).float())
    return mels
