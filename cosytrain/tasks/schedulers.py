"""Learning-rate schedules with upstream CosyVoice's formulas (``cosyvoice/utils/scheduler.py``).

Upstream recipes name ``warmuplr``, ``NoamHoldAnnealing`` and ``constantlr`` in ``train_conf``; a
fine-tune that continues an upstream run must see the same lr at the same step, so the arithmetic
(including the order of float operations) follows upstream exactly. Each is a plain
``torch.optim.lr_scheduler.LRScheduler`` whose ``state_dict`` Lightning checkpoints.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from cosytrain.errors import ConfigurationError


class WarmupLR(LRScheduler):
    """Noam-style warmup whose peak equals the optimizer's lr (reached at ``warmup_steps``).

    ``lr(step) = base_lr * warmup**0.5 * min(step**-0.5, step * warmup**-1.5)`` with
    ``step = last_epoch + 1``; ``warmup_steps == 0`` gives pure inverse-sqrt decay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int | float = 25000, last_epoch: int = -1):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(warmup_steps={self.warmup_steps})"

    def get_lr(self) -> list[float]:
        step = self.last_epoch + 1
        if self.warmup_steps == 0:
            return [base * step**-0.5 for base in self.base_lrs]
        scale = self.warmup_steps**0.5
        return [base * scale * min(step**-0.5, step * self.warmup_steps**-1.5) for base in self.base_lrs]

    def set_step(self, step: int) -> None:
        self.last_epoch = step


def _steps_or_ratio(steps: int | None, ratio: float | None, max_steps: int | None, what: str) -> int:
    if steps is not None and ratio is not None:
        raise ConfigurationError(f"NoamHoldAnnealing: give {what}_steps or {what}_ratio, not both")
    if ratio is not None:
        if max_steps is None:
            raise ConfigurationError(f"NoamHoldAnnealing: {what}_ratio needs max_steps")
        return int(ratio * max_steps)
    return steps if steps is not None else 0


class NoamHoldAnnealing(LRScheduler):
    """Linear warmup, hold at the peak, then polynomial decay (NeMo/Squeezeformer; upstream's copy).

    Phases by ``step = last_epoch``: ``step <= warmup`` -> ``base*(step+1)/(warmup+1)``;
    ``warmup <= step < warmup+hold`` -> ``base``; ``step > max_steps`` -> ``min_lr``; otherwise
    ``max(base * max(1, warmup**rate) / max(1, (step-hold)**rate), min_lr)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_steps: int,
        decay_rate: float = 0.5,
        min_lr: float = 0.0,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        hold_steps: int | None = None,
        hold_ratio: float | None = None,
        last_epoch: int = -1,
    ):
        self.max_steps = max_steps
        self.decay_rate = decay_rate
        self.min_lr = min_lr
        self.warmup_steps = _steps_or_ratio(warmup_steps, warmup_ratio, max_steps, "warmup")
        # Upstream stores the END of the hold phase (warmup + hold) here.
        hold = _steps_or_ratio(hold_steps, hold_ratio, max_steps, "hold")
        self.hold_steps = hold + self.warmup_steps if (hold_steps is not None or hold_ratio is not None) else 0
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step <= self.warmup_steps and self.warmup_steps > 0:
            frac = (step + 1) / (self.warmup_steps + 1)
            return [base * frac for base in self.base_lrs]
        if self.warmup_steps <= step < self.hold_steps:
            return list(self.base_lrs)
        if step > self.max_steps:
            return [self.min_lr for _ in self.base_lrs]
        return [self._decayed(base, step) for base in self.base_lrs]

    def _decayed(self, base: float, step: int) -> float:
        if not self.warmup_steps:
            raise ConfigurationError("NoamHoldAnnealing needs warmup_steps > 0 (or warmup_ratio)")
        pure_hold = self.hold_steps - self.warmup_steps if self.hold_steps > 0 else 0
        warm = max(1, self.warmup_steps**self.decay_rate)
        decay = max(1, (step - pure_hold) ** self.decay_rate)
        return max((base * warm) / decay, self.min_lr)

    def set_step(self, step: int) -> None:
        self.last_epoch = step


class ConstantLR(LRScheduler):
    """Keeps the optimizer's lr (upstream's ``constantlr``, used for SFT)."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return list(self.base_lrs)

    def set_step(self, step: int) -> None:
        self.last_epoch = step


# Upstream's train_conf names -> class. Lower-cased lookup keeps `noamholdannealing` working too.
SCHEDULERS: dict[str, type[LRScheduler]] = {
    "warmuplr": WarmupLR,
    "noamholdannealing": NoamHoldAnnealing,
    "constantlr": ConstantLR,
}
