"""When a task reads its ``init_from`` weights: when the run is set up, never when it resumes.

``init_from`` (weights only, from a pretrained model directory) and ``ckpt_path`` (the whole training
state, DESIGN.md) must not both be read: on resume the checkpoint holds every weight, so reading the
base directory again costs gigabytes of IO for nothing and fails when that directory has moved.
Lightning restores a checkpoint only AFTER the module's ``setup`` hook, and tells nobody before that
whether it will, so :class:`CosyTrainer` (what ``build_trainer`` and the CLI build) records the
``ckpt_path`` given to ``fit/validate/test/predict``; ``InitFrom.on_setup`` loads the weights unless
one was given.

A ``ckpt_path`` such as ``last`` may find nothing to restore (a first run); then the weights are
loaded as soon as that is known (the first train/validation/test/predict hook, after Lightning's
restore) rather than training from random weights. With a strategy that restores after setting the
model up (DeepSpeed) loading then is not safe, so that case is a one-line error instead.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional, Union

from lightning.pytorch import Trainer

from cosytrain.errors import ConfigurationError

log = logging.getLogger(__name__)

__all__ = ["CosyTrainer", "InitFrom", "requested_ckpt_path"]


class CosyTrainer(Trainer):
    """Lightning's ``Trainer`` that remembers the ``ckpt_path`` each stage was asked to restore
    (``requested_ckpt_path``), and whose ``precision`` also accepts cosytrain's ``auto``.

    LightningCLI types ``trainer.precision`` from the Trainer signature, which has no ``auto``; the
    value is resolved (``cosytrain.tasks.precision.resolve_auto_precision``) before the Trainer is
    built, so Lightning itself never sees it.
    """

    def __init__(self, *args: Any, precision: Optional[Union[str, int]] = None, **kwargs: Any) -> None:
        super().__init__(*args, precision=precision, **kwargs)
        self.requested_ckpt_path: Any = None

    def _remember(self, method: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(method).bind_partial(self, *args, **kwargs)
        self.requested_ckpt_path = bound.arguments.get("ckpt_path")

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        self._remember(Trainer.fit, args, kwargs)
        return super().fit(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        self._remember(Trainer.validate, args, kwargs)
        return super().validate(*args, **kwargs)

    def test(self, *args: Any, **kwargs: Any) -> Any:
        self._remember(Trainer.test, args, kwargs)
        return super().test(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._remember(Trainer.predict, args, kwargs)
        return super().predict(*args, **kwargs)


def requested_ckpt_path(trainer: Any) -> Any:
    """The ``ckpt_path`` the running stage was asked to restore (None: none, or a plain Trainer)."""
    return getattr(trainer, "requested_ckpt_path", None)


class InitFrom:
    """``path``'s weights, loaded by ``load(path)`` at setup unless the stage restores a checkpoint."""

    def __init__(self, path: Optional[str], load: Callable[[str], None]) -> None:
        self.path = path
        self._load = load
        self.loaded = False
        self.skipped_for: Any = None  # the ckpt_path that made us skip
        self.restored = False

    def on_setup(self, trainer: Any) -> None:
        if not self.path or self.loaded:
            return
        ckpt = requested_ckpt_path(trainer)
        if ckpt:
            self.skipped_for = ckpt
            log.info("init_from %s is not read: the weights come from ckpt_path=%s", self.path, ckpt)
            return
        self.load_now()

    def load_now(self) -> None:
        if self.path and not self.loaded:
            self._load(self.path)
            self.loaded = True

    def on_restored(self) -> None:
        """From ``on_load_checkpoint``: the weights came from a checkpoint."""
        self.restored = True

    def after_restore(self, trainer: Any) -> None:
        """From the first stage hook after Lightning's restore: load now if nothing was restored after all."""
        if self.skipped_for is None or self.restored or self.loaded:
            return
        if getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            raise ConfigurationError(f"ckpt_path={self.skipped_for} found no checkpoint to resume, and init_from "
                                     f"{self.path} cannot be loaded this late with {type(trainer.strategy).__name__};"
                                     " drop --ckpt_path for a first run")
        log.warning("ckpt_path=%s found no checkpoint to resume: starting from init_from %s", self.skipped_for,
                    self.path)
        self.load_now()
