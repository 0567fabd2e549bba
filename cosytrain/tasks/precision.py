"""Precision that means the same on every device.

Lightning turns ``precision='16-mixed'`` on CPU into ``bf16-mixed`` with only a warning, so a CPU
smoke run would not exercise the FP16 path (grad scaling, overflow skips) a GPU run takes. Here
``16-mixed`` always means FP16 autocast plus a ``torch.amp.GradScaler`` on the device that runs,
``bf16-mixed`` BF16 autocast without a scaler, and ``32-true`` neither. We hand Lightning an explicit
plugin instead of the string, which bypasses its CPU fallback. ``auto`` (cosytrain's own) picks
``16-mixed`` on CUDA and ``32-true`` elsewhere, for recipes meant to run anywhere.

Skipping a step whose grad norm is not finite is done by the task (``speech_task``), so it holds for
every precision, not only where a scaler exists.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from cosytrain.errors import ConfigurationError

log = logging.getLogger(__name__)

# the spellings Lightning accepts for the three precisions we own
_ALIASES = {
    "16-mixed": "16-mixed", "16": "16-mixed", 16: "16-mixed",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
    "32-true": "32-true", "32": "32-true", 32: "32-true",
}


class CosyMixedPrecision(MixedPrecision):
    """Lightning's AMP plugin, allowed to run FP16 (with a scaler) on CPU too.

    The scaler's state goes into checkpoints under this class's name (Lightning saves
    ``precision_plugin.state_dict()``), so a resumed FP16 run continues with the same loss scale.
    """

    def __init__(self, precision: str, device: str = "cpu", init_scale: float = 2.0**16) -> None:
        scaler = torch.amp.GradScaler(device=device, init_scale=init_scale) if precision == "16-mixed" else None
        super().__init__(precision, device=device, scaler=scaler)  # type: ignore[arg-type]

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None


def normalize_precision(precision: Any) -> str | None:
    """``16``/``'16'``/``'16-mixed'`` -> ``'16-mixed'`` etc.; ``None`` for a precision we leave to Lightning."""
    return _ALIASES.get(precision if not isinstance(precision, str) else precision.strip())


def autocast_device(accelerator: Any) -> str:
    """The ``torch.autocast`` device type for a Trainer ``accelerator`` value."""
    if isinstance(accelerator, Accelerator):
        if isinstance(accelerator, CPUAccelerator):
            return "cpu"
        if isinstance(accelerator, CUDAAccelerator):
            return "cuda"
        raise ConfigurationError(f"precision: cannot tell the autocast device of accelerator"
                                 f" {type(accelerator).__name__}")
    name = str(accelerator or "auto").lower()
    if name == "cpu":
        return "cpu"
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "mps":
        return "mps"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    raise ConfigurationError(f"precision: unsupported accelerator {accelerator!r}; use cpu, gpu/cuda, mps or auto")


def _names_deepspeed(strategy: Any) -> bool:
    return "deepspeed" in str(strategy if isinstance(strategy, str) else type(strategy).__name__).lower()


def _brings_own_precision(strategy: Any) -> bool:
    """DeepSpeed, FSDP and XLA need their own precision plugins; Lightning picks those from the string."""
    name = str(strategy if isinstance(strategy, str) else type(strategy).__name__).lower()
    return any(word in name for word in ("deepspeed", "fsdp", "xla"))


def resolve_auto_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """``precision: auto`` -> ``16-mixed`` where FP16 is fast (CUDA), ``32-true`` elsewhere.

    Default recipes say ``auto`` so one file trains fast on a GPU box and on a laptop CPU alike:
    CPU FP16 autocast is correct (the tests run it) but measured 5-10x slower than FP32 per step on
    the small demo models, so a CPU user asking for nothing in particular gets FP32. Any explicit
    precision, ``16-mixed`` included, is honoured as given on every device.
    """
    if not (isinstance(precision, str) and precision.strip() == "auto"):
        return precision
    resolved = "16-mixed" if autocast_device(accelerator) == "cuda" else "32-true"
    log.info("precision auto -> %s on %s", resolved, autocast_device(accelerator))
    return resolved


def precision_plugin(precision: Any, accelerator: Any = "auto") -> Precision:
    """The plugin that makes ``precision`` mean the same thing on ``accelerator`` (see module doc)."""
    precision = resolve_auto_precision(precision, accelerator)
    name = normalize_precision(precision)
    if name is None:
        raise ConfigurationError(f"precision={precision!r}: cosytrain supports '16-mixed', 'bf16-mixed' or '32-true'")
    if name == "32-true":
        return Precision()
    return CosyMixedPrecision(name, device=autocast_device(accelerator))


def apply_precision(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace ``precision`` in Trainer kwargs by our explicit plugin (returns a new dict).

    DeepSpeed is left to :func:`cosytrain.tasks.deepspeed.prepare_deepspeed_kwargs` (autocast inside the
    engine, ``auto`` -> ``bf16-mixed``/``32-true``; Lightning's own DeepSpeedStrategy refused); FSDP/XLA bring their own
    precision handling, and any precision outside our three is passed to Lightning unchanged; a
    plugin already in ``plugins`` wins.
    """
    kwargs = dict(trainer_kwargs)
    if _names_deepspeed(kwargs.get("strategy")):
        return kwargs  # cosytrain.tasks.deepspeed.prepare_deepspeed_kwargs resolved it (lightning_cli calls it first)
    if kwargs.get("precision") is not None:
        kwargs["precision"] = resolve_auto_precision(kwargs["precision"], kwargs.get("accelerator", "auto"))
    plugins = kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, Precision) for p in plugins) or _brings_own_precision(kwargs.get("strategy")):
        return kwargs
    precision = kwargs.get("precision")
    if precision is None:
        precision = "32-true"
    if normalize_precision(precision) is None:
        return kwargs
    plugins.append(precision_plugin(precision, kwargs.get("accelerator", "auto")))
    kwargs["plugins"] = plugins
    kwargs["precision"] = None
    return kwargs


def loss_scale(trainer: Any) -> float | None:
    """The current FP16 loss scale of a Trainer, or None when no scaler is in use."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return float(scaler.get_scale())
