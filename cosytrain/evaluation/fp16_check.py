"""FP16-vs-FP32 check: does a model still say the same thing under FP16 autocast?

A model trained with ``16-mixed`` is usually served with FP16 autocast (upstream ``fp16=True``). An
overflow in an activation, or a part that should have stayed FP32, shows up as NaN/inf or as a drift
the loss curve never reveals. This module runs a fixed set of utterances through each available stage
twice, FP32 and FP16 autocast, with the same seeds and the same noise, and compares:

* ``llm``: teacher-forced from the batch tokens (the part's own ``forward(batch, device)``, logits
  captured at its ``criterion_ce`` input, which also gives the target mask): top-1 agreement and
  ``KL(p_fp32 || p_fp16)`` of the next-token distributions at the target positions.
* ``flow``: ``inference`` from the batch's speech tokens, with the first third of each utterance
  (tokens + its mel) as the prompt when the batch has ``speech_feat``: mel L1 and (centred) cosine.
  The initial ODE noise of the FP32 run is replayed into the FP16 run (and both runs are seeded).
* ``hift``: ``inference`` on the **FP32** flow's mel (else the batch's mel), so its figure measures
  the vocoder alone: log-spectral distance and mel-cepstral distortion of the waveforms. Both runs
  are seeded identically, so the source excitation's random phases and noise are the same draws;
  ``source_max_abs_diff`` confirms it (0 unless the F0 itself moved under FP16).

Each stage also counts non-finite outputs. Definitions of the metrics: :mod:`cosytrain.evaluation.metrics`.
FP16 autocast runs on CUDA when the parts are on a CUDA device, else on the CPU (torch supports CPU
FP16 autocast; its kernels round differently from CUDA's, so the CPU figures indicate, not reproduce,
GPU behaviour); ``figures['autocast']`` says which.

The global RNG states (python, numpy, torch CPU and CUDA) and each part's train/eval mode are
restored afterwards, so running the check in the middle of training changes nothing.
Command line: ``python -m cosytrain check-fp16 --model_dir DIR [--data data.list]``
(:func:`cosytrain.evaluation.fp16_cli.main`, re-exported here with the table and model-card helpers;
the batch helpers live in :mod:`cosytrain.evaluation.fp16_batches`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cosytrain.evaluation import fp16_cli
from cosytrain.evaluation import metrics as M
from cosytrain.evaluation.fp16_batches import (
    DEFAULT_SEED,
    _length,
    _rows,
    batch_size,
    synthetic_batch,
    take_utterances,
)
from cosytrain.evaluation.fp16_cli import (
    CALLBACK_STATE_KEY,
    MODEL_CARD_KEY,
    figures_from_checkpoint,
    format_table,
    main,
    model_card_section,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "HIGHER_IS_BETTER",
    "MODEL_CARD_KEY",
    "CALLBACK_STATE_KEY",
    "FP16Report",
    "FP16RunError",
    "autocast_spec",
    "resolve_tolerances",
    "check_tolerances",
    "take_utterances",
    "batch_size",
    "synthetic_batch",
    "run_fp16_check",
    "flat_figures",
    "format_table",
    "model_card_section",
    "figures_from_checkpoint",
    "main",
]

IGNORE_ID = -1
FORMAT = 1
RESULT_FILE = fp16_cli.RESULT_FILE  # the command line's default output file

#: Metrics where larger is better (the tolerance is a lower bound); all others are upper bounds.
HIGHER_IS_BETTER = frozenset({"top1_agreement", "cosine", "sim"})

# Defaults, measured with CPU FP16 autocast (cosytrain's FP32 islands in place) on
# * synthetic utterances (3 seeds x 4) through the reference fixtures' v1/v2/v3 llm, flow and hift and
#   the randomly initialised demo-size v1 models (conf/model/*_small.yaml), and
# * 12 demo-corpus utterances through the demo recipe's llm+flow (recipes/sft.yaml) after 116
#   16-mixed training steps, vocoded by the v1 fixture hift.
# Worst figures seen: top-1 agreement 1.0, mean KL 1.1e-7 nats (max 1e-6), mel L1 2.1e-3 (cosine
# > 0.99999), LSD 0.32 dB and MCD 0.31 dB (the v3 fixture hift: its untrained, peaky spectrum puts most
# bins 60-80 dB down, near the FP16 rounding noise; v1/v2 and the demo stay below 0.15 / 0.1 dB).
# The bounds sit 3-25x above that (10^4 for KL, whose scale grows with vocabulary and depth): loose
# enough for full-size models and CUDA kernels (FP16 errors of the same order per op), tight enough
# that an overflow, a lost FP32 island or a broken FP16 kernel (errors of 1e-1 and more) fails. The
# agreement bound leaves room for near ties in real models' next-token distributions.
# Override per run (callback ``tolerances=``, CLI ``--tolerance``).
DEFAULT_TOLERANCES: dict[str, Optional[float]] = {
    "llm/top1_agreement": 0.95,
    "llm/kl_mean": 1e-3,
    "llm/nonfinite": 0,
    "llm/nonfinite_fp32": 0,
    "flow/mel_l1": 0.05,
    "flow/cosine": 0.999,
    "flow/nonfinite": 0,
    "flow/nonfinite_fp32": 0,
    "hift/lsd_db": 1.5,
    "hift/mcd_db": 1.0,
    "hift/nonfinite": 0,
    "hift/nonfinite_fp32": 0,
    # end-to-end audio as served (cosytrain.evaluation.fp16_speech, run by FP16EvalCallback(speech=True)):
    # the FP16 audio must still be the same voice (demo: 0.99+) and finite; MCD/WER are reported only
    "speech/sim": 0.95,
    "speech/nonfinite": 0,
}


# --------------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------------


def resolve_tolerances(overrides: Optional[Mapping[str, Optional[float]]] = None) -> dict[str, Optional[float]]:
    """Defaults updated with ``overrides`` (``'stage/metric' -> bound``; None switches a check off)."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_TOLERANCES:
            raise ValueError(f"unknown FP16 tolerance {key!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        tolerances[key] = None if value is None else float(value)
    return tolerances


def _passes(metric: str, value: float, bound: float) -> bool:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return value >= bound if metric in HIGHER_IS_BETTER else value <= bound


def check_tolerances(stages: Mapping[str, Mapping[str, Any]],
                     tolerances: Mapping[str, Optional[float]]) -> list[str]:
    """One message per figure outside its bound (NaN always fails), e.g. ``flow/mel_l1 = 0.8 > 0.05``."""
    failures = []
    for key, bound in tolerances.items():
        stage, metric = key.split("/", 1)
        if bound is None or stage not in stages:
            continue
        figs = stages[stage]
        if "error" in figs:
            continue
        if metric not in figs:
            continue
        value = figs[metric]
        if not _passes(metric, value, bound):
            op = "<" if metric in HIGHER_IS_BETTER else ">"
            failures.append(f"{key} = {value:.4g} {op} {bound:.4g}" if math.isfinite(value)
                            else f"{key} = {value} (not finite; bound {bound:.4g})")
    for stage, figs in stages.items():
        if "error" in figs:
            failures.append(f"{stage}: {figs['error']}")
    return failures


# --------------------------------------------------------------------------------------------------
# Precision, RNG and mode handling
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


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Restore python/numpy/torch (CPU + initialised CUDA) RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """eval() for the duration, then every submodule's own ``training`` flag back as it was."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


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



# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _module_device(module: nn.Module) -> torch.device:
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
    device = _module_device(llm)
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
    device = _module_device(flow)
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
    device = _module_device(hift)
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


def _batch_mels(batches: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    mels = []
    for batch, i in _rows(batches):
        if isinstance(batch.get("speech_feat"), torch.Tensor):
            feat = batch["speech_feat"][i, :_length(batch, "speech_feat", i)]
            mels.append(feat.t().unsqueeze(0).float())
    return mels


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


@dataclass
class FP16Report:
    """``figures``: JSON-able results (see :func:`run_fp16_check`); ``samples``: the first utterance's
    FP32/FP16 mels (n_mels, T) and waveforms (L,) for pictures and listening (empty unless asked)."""

    figures: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.figures["passed"])

    @property
    def failures(self) -> list[str]:
        return list(self.figures["failures"])


def run_fp16_check(batches: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, llm: Optional[nn.Module] = None,
                   flow: Optional[nn.Module] = None, hift: Optional[nn.Module] = None, num_utterances: int = 4,
                   tolerances: Optional[Mapping[str, Optional[float]]] = None, seed: int = DEFAULT_SEED,
                   keep_samples: bool = False) -> FP16Report:
    """Run every given stage in FP32 and under FP16 autocast and compare (see the module docstring).

    Returns figures::

        {"format": 1, "autocast": {"device_type", "dtype", "note"}, "seed", "num_utterances",
         "stages": {"llm": {...}, "flow": {...}, "hift": {...}},   # only the stages that ran
         "skipped": {stage: reason}, "errors": {stage: message}, "tolerances": {...},
         "failures": [...], "passed": bool}

    Nothing raises out of a stage: an exception only under FP16 is recorded as
    ``stages[stage] = {"error": ...}`` and fails the check; any other exception (data that does not
    fit the model, a part that cannot run even in FP32) goes to ``errors[stage]``, leaves that stage
    unchecked and does not count as an FP16 failure (``passed`` speaks about FP16 only).
    """
    tols = resolve_tolerances(tolerances)
    chosen = take_utterances(batches, num_utterances)
    present = [m for m in (llm, flow, hift) if m is not None]
    if not present:
        raise ValueError("run_fp16_check: give at least one of llm, flow, hift")
    spec = autocast_spec(_module_device(present[0]))
    stages: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    samples: dict[str, Any] = {}

    def attempt(stage: str, run: Any) -> Any:
        """FP16-only exceptions fail the stage; anything else (bad data, a part that cannot run at all)
        is an error that leaves the stage unchecked but does not count as an FP16 failure."""
        try:
            return run()
        except FP16RunError as exc:
            stages[stage] = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported, not raised: a check must not crash training
            errors[stage] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return None

    mels32: list[torch.Tensor] = []
    with _isolated_rng(), _eval_mode(present):
        if llm is not None:
            out = attempt("llm", lambda: check_llm(llm, chosen, spec, seed))
            if out is not None:
                stages["llm"] = out
        else:
            skipped["llm"] = "no llm part"
        if flow is not None:
            out = attempt("flow", lambda: check_flow(flow, chosen, spec, seed))
            if out is not None:
                stages["flow"], mels32, mels16 = out
                if keep_samples and mels32:
                    samples.update(mel_fp32=mels32[0][0].cpu(), mel_fp16=mels16[0][0].cpu())
        else:
            skipped["flow"] = "no flow part"
        if hift is not None:
            source = mels32 or _batch_mels(chosen)
            if not source:
                skipped["hift"] = "no mel to vocode (no flow output and no speech_feat in the batch)"
            else:
                out = attempt("hift", lambda: check_hift(hift, source, spec, seed))
                if out is not None:
                    stages["hift"], wavs32, wavs16 = out
                    stages["hift"]["mel_source"] = "flow_fp32" if mels32 else "batch"
                    if keep_samples:
                        samples.update(wav_fp32=wavs32[0], wav_fp16=wavs16[0],
                                       sample_rate=stages["hift"]["sample_rate"])
        else:
            skipped["hift"] = "no vocoder"
    failures = check_tolerances(stages, tols)
    figures = {
        "format": FORMAT,
        "autocast": {"device_type": spec.device_type, "dtype": "float16", "note": spec.note},
        "seed": int(seed),
        "num_utterances": sum(batch_size(b) for b in chosen),
        "stages": stages,
        "skipped": skipped,
        "errors": errors,
        "tolerances": {k: v for k, v in tols.items() if k.split("/", 1)[0] in stages},
        "failures": failures,
        "passed": not failures,
    }
    return FP16Report(figures=_plain(figures), samples=samples)


def _plain(value: Any) -> Any:
    """Only dict/list/str/int/float/bool/None, so figures survive json and ``torch.load(weights_only=True)``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _plain(value.item())
    return str(value)


def flat_figures(figures: Mapping[str, Any], prefix: str = "fp16") -> dict[str, float]:
    """Scalars for a logger: ``fp16/<stage>/<metric>`` plus ``fp16/passed`` (1.0 or 0.0)."""
    out: dict[str, float] = {}
    for stage, figs in figures.get("stages", {}).items():
        for metric, value in figs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_rate":
                out[f"{prefix}/{stage}/{metric}"] = float(value)
        if "error" in figs:
            out[f"{prefix}/{stage}/error"] = 1.0
    out[f"{prefix}/passed"] = 1.0 if figures.get("passed") else 0.0
    return out


if __name__ == "__main__":
    raise SystemExit(main())
