"""Optimizer + lr schedule from upstream's ``train_conf`` dict.

Keeping upstream's keys (``optim``, ``optim_conf``, ``scheduler``, ``scheduler_conf``, ``grad_clip``,
``accum_grad``) lets an upstream recipe's ``train_conf`` be pasted into a cosytrain recipe. Upstream
keys that belong to the loop (``max_epoch``, ``log_interval``, ``save_per_step``) are refused with
the Trainer option that replaces them, so nothing is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from cosytrain.errors import ConfigurationError
from cosytrain.tasks.schedulers import SCHEDULERS, ConstantLR

# sgd (plain, no state without momentum) also serves memory-bound smoke runs of official-size models
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                                                      "sgd": torch.optim.SGD}

# upstream train_conf key -> what to use instead in cosytrain
_MOVED_KEYS = {
    "max_epoch": "trainer.max_epochs",
    "log_interval": "trainer.log_every_n_steps",
    "save_per_step": "a ModelCheckpoint callback's every_n_train_steps",
    "dtype": "trainer.precision",
}


def _typed(value: Any) -> Any:
    """A command-line value kept as text (``--model.init_args.train_conf.optim_conf.lr 2e-3`` arrives as
    the string "2e-3": ``train_conf`` is a free-form dict, so jsonargparse cannot type it) -> its number
    or YAML value; anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


@dataclass
class TrainConf:
    """The optimisation part of upstream's ``train_conf`` (defaults: upstream's v1 recipe)."""

    optim: str = "adam"
    optim_conf: dict[str, Any] = field(default_factory=lambda: {"lr": 0.001})
    scheduler: str = "warmuplr"
    scheduler_conf: dict[str, Any] = field(default_factory=lambda: {"warmup_steps": 2500})
    grad_clip: float = 5.0
    accum_grad: int = 1

    @classmethod
    def from_dict(cls, conf: Mapping[str, Any] | None) -> "TrainConf":
        conf = dict(conf or {})
        for key, instead in _MOVED_KEYS.items():
            if key in conf:
                raise ConfigurationError(f"train_conf.{key} is upstream's loop setting; use {instead} instead")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(conf) - known)
        if unknown:
            raise ConfigurationError(f"train_conf has unknown key(s) {unknown}; known: {sorted(known)}")
        for key in ("optim_conf", "scheduler_conf"):
            if isinstance(conf.get(key), Mapping):
                conf[key] = {k: _typed(v) for k, v in conf[key].items()}
        for key in ("grad_clip", "accum_grad"):
            if key in conf:
                conf[key] = _typed(conf[key])
        out = cls(**conf)
        if out.optim.lower() not in OPTIMIZERS:
            raise ConfigurationError(f"train_conf.optim={out.optim!r} is not one of {sorted(OPTIMIZERS)}")
        if out.scheduler.lower() not in SCHEDULERS:
            raise ConfigurationError(f"train_conf.scheduler={out.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if int(out.accum_grad) < 1:
            raise ConfigurationError(f"train_conf.accum_grad must be >= 1, got {out.accum_grad}")
        return out


def build_optimizer(params: Iterable[torch.nn.Parameter], conf: TrainConf) -> torch.optim.Optimizer:
    """``optim`` + ``optim_conf`` -> a torch optimizer (the kwargs go to the constructor unchanged)."""
    params = list(params)
    if not params:
        raise ConfigurationError("no trainable parameters: every parameter is frozen (check the task's `freeze` list)")
    try:
        return OPTIMIZERS[conf.optim.lower()](params, **conf.optim_conf)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"train_conf.optim_conf={conf.optim_conf!r} does not suit {conf.optim}: "
                                 f"{' '.join(str(exc).split())}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, conf: TrainConf) -> torch.optim.lr_scheduler.LRScheduler:
    """``scheduler`` + ``scheduler_conf`` -> an lr schedule; upstream's constantlr ignores its conf."""
    cls = SCHEDULERS[conf.scheduler.lower()]
    if cls is ConstantLR:
        return ConstantLR(optimizer)
    try:
        return cls(optimizer, **conf.scheduler_conf)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"train_conf.scheduler_conf={conf.scheduler_conf!r} does not suit "
                                 f"{conf.scheduler}: {' '.join(str(exc).split())}") from None


def build_optimization(params: Iterable[torch.nn.Parameter], conf: Mapping[str, Any] | TrainConf) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: the schedule steps once per optimizer step."""
    conf = conf if isinstance(conf, TrainConf) else TrainConf.from_dict(conf)
    optimizer = build_optimizer(params, conf)
    scheduler = build_scheduler(optimizer, conf)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
