"""DeepSpeed ZeRO that keeps cosytrain's precision and clipping (``conf/strategy/deepspeed_zero{2,3}.yaml``).

What Lightning 2.6's own ``DeepSpeedStrategy`` does, read from its source: ``precision='16-mixed'``
adds ``{"fp16": {"enabled": true, ...}}`` to the DeepSpeed config, so DeepSpeed's FP16 engine halves
the module and ``DeepSpeedPrecision.convert_input`` casts every float input to FP16; there is no
``torch.autocast`` (its ``forward_context`` is a no-op, and DeepSpeed >= 0.17.2 switches an outer
autocast off inside the engine unless its own ``torch_autocast`` section is on). The models' FP32
islands (LayerNorm, the flow's time embedding and ODE state, HiFT's phase/STFT) then run in FP16. And
``gradient_clipping`` is taken from ``trainer.gradient_clip_val``, not from the recipe's
``train_conf.grad_clip`` (the task's own clipping steps aside under DeepSpeed).

The choice made here, for BOTH overlays (ZeRO-2 and ZeRO-3): precision is autocast as everywhere else
in cosytrain, with DeepSpeed's ZeRO optimizer over FP32 parameters. :class:`CosyDeepSpeedStrategy`
writes DeepSpeed's ``torch_autocast`` section (the module stays FP32, the engine runs its forward under
``torch.autocast``, so the FP32 islands hold) and switches DeepSpeed's ``fp16``/``bf16`` engines off;
``gradient_clipping`` is the task's ``train_conf.grad_clip`` (a different ``trainer.gradient_clip_val``
is refused in one line). ZeRO-3's memory is not worse for it: its partitions hold FP32 parameters
that are also the master weights (4 + 4 + 8 bytes a parameter for weights, grads and Adam moments,
against 2 + 2 + 12 with the FP16 engine); only the per-layer gathered copy is FP32.

Precisions: ``bf16-mixed`` (the overlays' choice) and ``32-true``. ``16-mixed`` is refused: with
deepspeed 0.19.8, ZeRO + ``torch_autocast`` FP16 never lowers its GradScaler's scale after an
overflow (ZeRO's step returns before ``scaler.update()``: every later step overflows and is skipped,
reproduced on CPU) and clips the still-scaled gradients; DeepSpeed's own FP16 engine drops the FP32
islands. FP16 with a working scaler is cosytrain's DDP path (``conf/strategy/ddp.yaml``).

Parts run outside the engine (callbacks that synthesise, the FP16 check) need whole parameters under
ZeRO-3, where each rank holds a slice: :func:`gathered_parameters` gathers them on every rank
(``deepspeed.zero.GatheredParameters``, a collective: call it on all ranks) and is a no-op otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from cosytrain.tasks.precision import normalize_precision

log = logging.getLogger(__name__)

MIN_DEEPSPEED = (0, 17, 2)  # torch_autocast with ZeRO
_AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16"}
OVERLAY_HINT = "use conf/strategy/deepspeed_zero2.yaml or deepspeed_zero3.yaml (cosytrain.tasks.deepspeed.CosyDeepSpeedStrategy)"


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed setting cosytrain refuses, said in one line with the fix."""


def refuse_fp16(precision: Any) -> None:
    if normalize_precision(precision) == "16-mixed":
        raise DeepSpeedConfigError(
            "trainer.precision=16-mixed with DeepSpeed: its torch_autocast FP16 never lowers the loss scale after an"
            " overflow (deepspeed 0.19.8, ZeRO) and its fp16 engine halves the module (no FP32 islands); use"
            " bf16-mixed or 32-true with DeepSpeed, or FP16 with conf/strategy/ddp.yaml")


class CosyDeepSpeedPrecision(DeepSpeedPrecision):
    """``bf16-mixed``/``32-true`` for :class:`CosyDeepSpeedStrategy`: the module and inputs stay as they are.

    Lightning's ``DeepSpeedPrecision`` casts float inputs to the half dtype for DeepSpeed's half engines;
    here autocast (DeepSpeed's ``torch_autocast``, inside the engine's forward) picks each op's dtype.
    """

    def __init__(self, precision: Any) -> None:
        refuse_fp16(precision)
        name = normalize_precision(precision)
        if name not in ("bf16-mixed", "32-true"):
            raise DeepSpeedConfigError(f"trainer.precision={precision!r} with DeepSpeed: use bf16-mixed or 32-true")
        super().__init__(name)  # type: ignore[arg-type]

    def convert_input(self, data: Any) -> Any:
        return data  # token ids stay integer, features FP32: autocast casts per op

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.precision == "bf16-mixed" else None


def resolve_deepspeed_precision(precision: Any) -> Any:
    """``auto`` (or nothing) under DeepSpeed -> ``bf16-mixed`` where CUDA has BF16, else ``32-true``; FP16 refused."""
    if precision is None or (isinstance(precision, str) and precision.strip() == "auto"):
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16-mixed" if precision is not None and bf16 else "32-true"
    refuse_fp16(precision)
    return precision


def check_strategy(strategy: Any) -> None:
    """Lightning's own DeepSpeed strategy (by name or object) is refused: it halves the module and drops the recipe's clip."""
    plain = (isinstance(strategy, str) and "deepspeed" in strategy.lower()
             or isinstance(strategy, DeepSpeedStrategy) and not isinstance(strategy, CosyDeepSpeedStrategy))
    if plain:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise DeepSpeedConfigError(f"trainer.strategy={name}: Lightning's DeepSpeed strategy runs 16-mixed as DeepSpeed's"
                                   " FP16 engine (module halved, no FP32 islands) and ignores train_conf.grad_clip;"
                                   f" {OVERLAY_HINT}")


def prepare_deepspeed_kwargs(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs naming a DeepSpeed strategy: refuse Lightning's own, resolve ``precision`` (a new dict)."""
    kwargs = dict(trainer_kwargs)
    strategy = kwargs.get("strategy")
    if "deepspeed" in str(strategy if isinstance(strategy, str) else type(strategy).__name__).lower():
        check_strategy(strategy)
        kwargs["precision"] = resolve_deepspeed_precision(kwargs.get("precision"))
    return kwargs


def precision_config(precision: str) -> dict[str, Any]:
    """The DeepSpeed config sections for a cosytrain precision: half engines off, ``torch_autocast`` on or off."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    autocast: dict[str, Any] = {"enabled": dtype is not None}
    if dtype is not None:
        autocast["dtype"] = dtype
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}, "torch_autocast": autocast}


def resolve_gradient_clipping(task_clip: Optional[float], trainer_clip: Optional[float],
                              config_clip: Optional[float]) -> float:
    """The one ``gradient_clipping`` DeepSpeed gets: the recipe's ``train_conf.grad_clip``; a conflict is refused."""
    if task_clip is None:  # a module without train_conf: Lightning's own rule (trainer, then config)
        return float(trainer_clip if trainer_clip is not None else config_clip or 0.0)
    for where, value in (("trainer.gradient_clip_val", trainer_clip), ("the DeepSpeed config's gradient_clipping",
                                                                       config_clip)):
        if value is not None and float(value) != float(task_clip):
            raise DeepSpeedConfigError(f"gradient clipping is set twice ({where}={value}, train_conf.grad_clip="
                                       f"{task_clip}); set only train_conf.grad_clip, DeepSpeed clips at it")
    return float(task_clip)


def _deepspeed_version() -> tuple[int, ...]:
    import deepspeed

    parts = []
    for piece in str(deepspeed.__version__).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class CosyDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with cosytrain's precision and clipping (see the module docstring).

    Takes every ``DeepSpeedStrategy`` argument. A ``config`` (dict or JSON path) that enables DeepSpeed's
    ``fp16``/``bf16`` engine or sets ``torch_autocast`` is refused: precision comes from
    ``trainer.precision`` only.
    """

    strategy_name = "cosy_deepspeed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # raises Lightning's one-liner when deepspeed is not installed
        if _deepspeed_version() < MIN_DEEPSPEED:
            raise DeepSpeedConfigError(f"deepspeed {'.'.join(map(str, _deepspeed_version()))} is too old: cosytrain's"
                                       f" DeepSpeed overlays need deepspeed>={'.'.join(map(str, MIN_DEEPSPEED))}"
                                       " (torch_autocast with ZeRO); pip install -e '.[deepspeed]'")
        config = self.config or {}
        for section in ("fp16", "bf16"):
            if isinstance(config.get(section), dict) and config[section].get("enabled"):
                raise DeepSpeedConfigError(f"the DeepSpeed config enables its {section} engine (module halved, no"
                                           " autocast, the models' FP32 islands lost); remove that section and set"
                                           " trainer.precision (bf16-mixed or 32-true)")
        if "torch_autocast" in config:
            raise DeepSpeedConfigError("the DeepSpeed config sets torch_autocast; remove it and set trainer.precision"
                                       " (cosytrain writes that section from it)")

    # precision: whatever Lightning's connector makes of trainer.precision becomes CosyDeepSpeedPrecision
    @property
    def precision_plugin(self) -> Precision:
        plugin = self._precision_plugin
        return plugin if plugin is not None else CosyDeepSpeedPrecision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        if plugin is not None and not isinstance(plugin, CosyDeepSpeedPrecision):
            if not isinstance(plugin, DeepSpeedPrecision) and type(plugin) is not Precision:
                raise DeepSpeedConfigError(f"precision plugin {type(plugin).__name__} cannot run under DeepSpeed; set"
                                           " trainer.precision to bf16-mixed or 32-true")
            plugin = CosyDeepSpeedPrecision(getattr(plugin, "precision", "32-true"))
        self._precision_plugin = plugin

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            raise DeepSpeedConfigError(f"{type(module).__name__} steps its optimizers itself (e.g. the vocoder's GAN"
                                       " with two); DeepSpeed drives one: train it with conf/strategy/ddp.yaml")
        super().setup(trainer)

    def _format_config(self) -> None:
        assert isinstance(self.config, dict)
        self.config.update(precision_config(self.precision_plugin.precision))
        module = self.lightning_module
        if module is not None:
            conf = getattr(module, "train_conf", None)
            task_clip = getattr(conf, "grad_clip", None)
            self.config["gradient_clipping"] = resolve_gradient_clipping(
                None if task_clip is None else float(task_clip or 0.0), module.trainer.gradient_clip_val,
                self.config.get("gradient_clipping"))
        super()._format_config()  # batch size, accumulation; fp16/bf16 present already, so left alone


def zero3_active(trainer: Any) -> bool:
    """True when ``trainer`` runs DeepSpeed ZeRO stage 3 (parameters partitioned across ranks)."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    config = strategy.config if isinstance(strategy.config, dict) else {}
    return (config.get("zero_optimization") or {}).get("stage") == 3


@contextmanager
def gathered_parameters(trainer: Any, *modules: Optional[nn.Module]) -> Iterator[None]:
    """The whole parameters of ``modules`` on this rank for code run outside the engine; a no-op unless ZeRO-3.

    Under ZeRO-3 each rank holds a slice of every parameter (outside the engine's forward a parameter
    is an empty tensor); this all-gathers them read-only (``modifier_rank=None``) for the duration.
    It is a collective: every rank must enter it, also those that then do nothing inside.
    """
    if not zero3_active(trainer):
        yield
        return
    import deepspeed

    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
