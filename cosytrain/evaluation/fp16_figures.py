"""The figures of the FP16 check: tolerances, pass/fail, the table, the model card, logger scalars.

What :func:`cosytrain.evaluation.fp16_check.run_fp16_check` measures is judged here against
:data:`DEFAULT_TOLERANCES` (overridable per run), printed by :func:`format_table`, stored in a model
directory's ``cosytrain.json`` under :data:`MODEL_CARD_KEY` (:func:`model_card_section`; ``cosytrain
export`` writes the same section from the last figures an ``FP16EvalCallback`` saved into the
checkpoint: :func:`figures_from_checkpoint`) and logged as flat scalars (:func:`flat_figures`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from cosytrain.errors import ConfigurationError

__all__ = [
    "DEFAULT_TOLERANCES",
    "HIGHER_IS_BETTER",
    "MODEL_CARD_KEY",
    "CALLBACK_STATE_KEY",
    "RESULT_FILE",
    "resolve_tolerances",
    "passes",
    "check_tolerances",
    "plain",
    "flat_figures",
    "format_table",
    "model_card_section",
    "figures_from_checkpoint",
]

#: ``cosytrain.json`` key holding :func:`model_card_section`.
MODEL_CARD_KEY = "fp16_check"
#: ``checkpoint['callbacks']`` key of :class:`cosytrain.tasks.fp16_callback.FP16EvalCallback`'s state.
CALLBACK_STATE_KEY = "FP16EvalCallback"
RESULT_FILE = "fp16_check.json"


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
            raise ConfigurationError(f"unknown FP16 tolerance {key!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        tolerances[key] = None if value is None else float(value)
    return tolerances


def passes(metric: str, value: float, bound: float) -> bool:
    """Within the bound (a lower bound for :data:`HIGHER_IS_BETTER` metrics); NaN never passes."""
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
        if not passes(metric, value, bound):
            op = "<" if metric in HIGHER_IS_BETTER else ">"
            failures.append(f"{key} = {value:.4g} {op} {bound:.4g}" if math.isfinite(value)
                            else f"{key} = {value} (not finite; bound {bound:.4g})")
    for stage, figs in stages.items():
        if "error" in figs:
            failures.append(f"{stage}: {figs['error']}")
    return failures


# --------------------------------------------------------------------------------------------------
# Plain figures, the table and the model card
# --------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Only dict/list/str/int/float/bool/None, so figures survive json and ``torch.load(weights_only=True)``."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return plain(value.item())
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


def format_table(figures: Mapping[str, Any]) -> str:
    """A plain-text table: stage, metric, value, bound, ok."""
    tols = figures.get("tolerances", {})
    rows = [("stage", "metric", "value", "bound", "ok")]
    for stage, figs in figures.get("stages", {}).items():
        if "error" in figs:
            rows.append((stage, "error", figs["error"], "", "FAIL"))
            continue
        for metric, value in figs.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            bound = tols.get(f"{stage}/{metric}")
            ok = "" if bound is None else ("ok" if passes(metric, value, bound) else "FAIL")
            shown_bound = "" if bound is None else (">= " if metric in HIGHER_IS_BETTER else "<= ") + f"{bound:.4g}"
            shown = str(value) if isinstance(value, int) else f"{value:.6g}"
            rows.append((stage, metric, shown, shown_bound, ok))
    widths = [max(len(str(r[c])) for r in rows) for c in range(5)]
    lines = ["  ".join(str(r[c]).ljust(widths[c]) for c in range(5)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for stage, reason in figures.get("skipped", {}).items():
        lines.append(f"{stage}: skipped ({reason})")
    for stage, message in figures.get("errors", {}).items():
        lines.append(f"{stage}: NOT CHECKED, it could not run: {message}")
    note = figures.get("autocast", {}).get("note")
    if note:
        lines.append(f"precision: {note}")
    if not figures.get("passed"):
        lines.append("FAILED: " + "; ".join(figures.get("failures", [])))
    elif figures.get("errors"):
        lines.append(f"INCOMPLETE: {', '.join(figures['errors'])} not checked; the checked stages are within bounds")
    else:
        lines.append("PASSED")
    return "\n".join(lines)


def model_card_section(figures: Mapping[str, Any]) -> dict[str, Any]:
    """What ``cosytrain.json`` stores under :data:`MODEL_CARD_KEY`: verdict, precision note and figures."""
    return plain({
        "passed": bool(figures.get("passed")),
        "failures": list(figures.get("failures", [])),
        "autocast": dict(figures.get("autocast", {})),
        "num_utterances": figures.get("num_utterances"),
        "seed": figures.get("seed"),
        "stages": dict(figures.get("stages", {})),
        "skipped": dict(figures.get("skipped", {})),
        "errors": dict(figures.get("errors", {})),
        "tolerances": dict(figures.get("tolerances", {})),
        **({"source": figures["source"]} if "source" in figures else {}),
    })


def figures_from_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The last figures an :class:`FP16EvalCallback` saved into a Lightning checkpoint dict, or None."""
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    if not isinstance(callbacks, Mapping):
        return None
    state = callbacks.get(CALLBACK_STATE_KEY)
    if isinstance(state, Mapping) and isinstance(state.get("last_figures"), Mapping):
        return dict(state["last_figures"])
    return None
