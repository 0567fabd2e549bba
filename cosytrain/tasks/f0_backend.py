"""Which F0 a vocoder run trains toward, said out loud, and refused where it would move pretrained weights.

The vocoder's F0 loss compares its F0 predictor with the data's ``pitch_feat``, made by
``cosytrain.data.features.compute_f0``: upstream's pyworld when it imports, a YIN stand-in otherwise.
Fine-tuning the official HiFT toward the stand-in's (different) values would quietly retrain its F0
predictor, so ``check_f0_backend`` refuses that unless the recipe sets ``allow_yin_f0_stand_in``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from cosytrain.errors import ConfigurationError

log = logging.getLogger(__name__)

DESCRIPTIONS = {"pyworld": "pyworld (harvest + stonemask), as upstream",
                "yin": "yin stand-in (pyworld missing): F0 targets differ from upstream's"}


def check_f0_backend(init_from: Optional[str], allow_yin_f0_stand_in: bool) -> str:
    """The backend ``compute_f0`` uses in this environment; one-line error for the stand-in with pretrained weights."""
    from cosytrain.data import features

    backend = features.f0_backend()
    if backend == "pyworld":
        log.info("HiFTTask: F0 targets from %s", DESCRIPTIONS[backend])
        return backend
    why = features.f0_backend_problem() or "pyworld is not installed"
    if init_from and not allow_yin_f0_stand_in:
        raise ConfigurationError(
            f"init_from {init_from}: fine-tuning pretrained vocoder weights needs upstream's exact F0 targets"
            f" (pyworld), but {why}; pip install 'cosytrain[vocoder]', or set"
            " model.init_args.allow_yin_f0_stand_in: true to train the F0 predictor toward the YIN stand-in")
    log.warning("HiFTTask: F0 targets from the YIN stand-in (%s); they differ from upstream's pyworld F0."
                " pip install 'cosytrain[vocoder]' for the exact targets", why)
    return backend


def log_f0_backend(trainer: Any, backend: Optional[str], step: int) -> None:
    """TensorBoard text ``data/f0_backend`` and an ``f0_backend`` hyperparameter (hparams.yaml)."""
    if backend is None or not trainer.is_global_zero:
        return
    from cosytrain.tasks.callbacks import _tensorboard

    writer = _tensorboard(trainer)
    if writer is not None:
        writer.add_text("data/f0_backend", DESCRIPTIONS.get(backend, backend), step)
    for logger in trainer.loggers:
        logger.log_hyperparams({"f0_backend": backend})
