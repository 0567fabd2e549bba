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

One module per job: the stage comparisons are :mod:`cosytrain.evaluation.fp16_stages`, the
tolerances, table and model card :mod:`cosytrain.evaluation.fp16_figures`, the batches
:mod:`cosytrain.evaluation.fp16_batches`, the command line (``python -m cosytrain check-fp16
--model_dir DIR [--data data.list]``) :mod:`cosytrain.evaluation.fp16_cli`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cosytrain.evaluation.fp16_batches import DEFAULT_SEED, batch_size, take_utterances
from cosytrain.evaluation.fp16_figures import check_tolerances, plain, resolve_tolerances
from cosytrain.evaluation.fp16_stages import (
    FP16RunError,
    autocast_spec,
    batch_mels,
    check_flow,
    check_hift,
    check_llm,
    module_device,
)

__all__ = ["FP16Report", "run_fp16_check"]

FORMAT = 1


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
    spec = autocast_spec(module_device(present[0]))
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
            source = mels32 or batch_mels(chosen)
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
    return FP16Report(figures=plain(figures), samples=samples)
