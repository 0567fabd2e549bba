"""EMA weights: Lightning's own ``EMAWeightAveraging``, with three gaps closed for cosytrain's runs.

One recipe line turns it on (off in every fine-tuning recipe: on a short fine-tune the average lags
behind the few hundred steps that matter, F5-TTS's README warns the same)::

    trainer:
      callbacks:
        - class_path: cosytrain.tasks.ema.EMAWeights
          init_args: {decay: 0.999}

What Lightning's callback does and we keep: after every optimizer step the average is updated
(``torch.optim.swa_utils`` EMA, ``decay * ema + (1 - decay) * weights``; the first update copies the
weights); validation runs on the averaged weights; a checkpoint's ``state_dict`` holds the average
and ``current_model_state`` the raw weights, and resuming restores both (and the update count)
exactly; when training ends the module holds the average. ``python -m cosytrain export --weights
ema|raw`` picks one of the two (default: the average when the checkpoint has one).

Where Lightning 2.6's ``WeightAveraging`` falls short, and what this subclass changes:

1. It swaps the raw weights back in its own ``on_validation_epoch_end``, so whether another
   callback's ``on_validation_epoch_end`` (the FP16 check, synthesis figures, mel images) sees the
   average depends on the order of the callbacks in the recipe. Here the swap back happens in
   ``on_validation_end``, after every ``on_validation_epoch_end`` and still before the checkpoint
   callbacks save (Lightning runs checkpoint callbacks last): every callback that looks at the model
   during validation sees the EMA weights.
2. The average is deep-copied from the module in ``setup``, before the module's own setup and before
   a checkpoint is restored; until the first update a validation (the sanity check, a first
   ``val_check_interval``) would run on that stale copy. Here, when the average has not been
   updated yet, it is refreshed from the module in ``on_fit_start`` (after restore and setup).
3. The epoch of the last per-epoch update is not saved; here it is.

Not changed: the average is a full copy of the module (so with LoRA it also copies the frozen base;
the frozen values average to themselves).
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

__all__ = ["EMAWeights", "has_ema_weights"]


def has_ema_weights(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint was saved by a weight-averaging callback (average in ``state_dict``)."""
    return isinstance(checkpoint.get("current_model_state"), dict) and "averaging_state" in checkpoint


class EMAWeights(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments: ``decay``, ``update_every_n_steps``,
    ``update_starting_at_step``, ``update_starting_at_epoch``, ``device``, ``use_buffers``), with the
    changes listed in the module docstring."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        if average is not None and int(average.n_averaged) == 0:
            with torch.no_grad():
                pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                            itertools.chain(pl_module.parameters(), pl_module.buffers()))
                for averaged, current in pairs:
                    averaged.copy_(current.detach().to(averaged.device))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the raw weights come back in on_validation_end, after every callback's epoch-end hook

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))
