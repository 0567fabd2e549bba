"""Training callbacks: things to watch that are not the loss.

* ``MelImageLogger``: a flow model can have a fine loss and still make blurry mels; an image of the
  target next to a synthesised mel shows that at a glance (TensorBoard "Images" tab). Under DeepSpeed
  ZeRO-3 every rank gathers the flow's parameters, then rank 0 draws.
* ``SkippedDataLogger``: the data pipeline drops utterances (too long, bad tokens, unreadable audio);
  a silently growing count means the recipe's filters or the shards are wrong.
* ``StepCheckpoint``: step-interval checkpoints that also keep ``last.ckpt`` current at the end.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cosytrain.tasks.deepspeed import gathered_parameters

log = logging.getLogger(__name__)


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            return experiment
    return None


def mel_to_image(mel: torch.Tensor, time_first: bool = True) -> torch.Tensor:
    """A 2-D log-mel ((T, n_mels) if ``time_first`` else (n_mels, T)) -> (3, n_mels, T) RGB in [0, 1].

    Low frequencies end up at the bottom, as in every spectrogram plot.
    """
    mel = mel.detach().float().cpu()
    if mel.dim() != 2:
        raise ValueError(f"mel_to_image expects a 2-D mel, got shape {list(mel.shape)}")
    if time_first:
        mel = mel.t()
    lo, hi = mel.min(), mel.max()
    norm = ((mel - lo) / (hi - lo).clamp_min(1e-5)).flip(0)
    try:
        from matplotlib import colormaps

        return torch.from_numpy(colormaps["viridis"](norm.numpy())[..., :3]).permute(2, 0, 1).float()
    except ImportError:  # grey image when matplotlib is missing
        return norm.unsqueeze(0).repeat(3, 1, 1)


def synthesize_mel(flow: torch.nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor | None:
    """The flow's mel (n_mels, T) for the batch's first utterance with no prompt, or None if unsupported.

    Uses upstream's ``inference(token, token_len, prompt_token, prompt_token_len, prompt_feat,
    prompt_feat_len, embedding[, flow_cache])`` signature; other signatures are skipped.
    """
    infer = getattr(flow, "inference", None)
    if infer is None or "speech_token" not in batch or "embedding" not in batch:
        return None
    n = int(batch["speech_token_len"][0]) if "speech_token_len" in batch else batch["speech_token"].shape[1]
    n_mels = int(batch["speech_feat"].shape[-1]) if "speech_feat" in batch else 80
    args = {
        "token": batch["speech_token"][:1, :n].to(device),
        "token_len": torch.tensor([n], dtype=torch.int32, device=device),
        "prompt_token": torch.zeros(1, 0, dtype=torch.int32, device=device),
        "prompt_token_len": torch.tensor([0], dtype=torch.int32, device=device),
        "prompt_feat": torch.zeros(1, 0, n_mels, device=device),
        "prompt_feat_len": torch.tensor([0], dtype=torch.int32, device=device),
        "embedding": batch["embedding"][:1].to(device),
        "flow_cache": torch.zeros(1, n_mels, 0, 2, device=device),
        "finalize": True,
    }
    params = inspect.signature(infer).parameters
    if any(p not in args for p, spec in params.items() if spec.default is inspect.Parameter.empty):
        return None
    out = infer(**{k: v for k, v in args.items() if k in params})
    mel = out[0] if isinstance(out, (tuple, list)) else out
    return mel[0].float() if mel.dim() == 3 else mel.float()


class MelImageLogger(pl.Callback):
    """On validation, logs the first utterance's target mel and (``synthesize=True``) the flow's own.

    Args:
        every_n_epochs: log on validation runs of every n-th epoch.
        synthesize: also run ``flow.inference`` (ODE solve, costs a few forward passes).
    """

    def __init__(self, every_n_epochs: int = 1, synthesize: bool = True) -> None:
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.synthesize = synthesize
        self._failed = False
        self.logged: list[str] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # every test up to the gather gives the same answer on every rank (ZeRO-3's gather is a collective)
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        if trainer.current_epoch % self.every_n_epochs or not isinstance(batch, Mapping) or "speech_feat" not in batch:
            return
        flow = getattr(pl_module, "flow", None)
        with gathered_parameters(trainer, flow if self.synthesize else None):
            if trainer.is_global_zero:
                self._log_images(trainer, pl_module, batch, flow)

    def _log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any],
                    flow: torch.nn.Module | None) -> None:
        writer = _tensorboard(trainer)
        if writer is None:
            return
        step = trainer.global_step
        length = int(batch["speech_feat_len"][0]) if "speech_feat_len" in batch else batch["speech_feat"].shape[1]
        writer.add_image("val/mel_target", mel_to_image(batch["speech_feat"][0, :length]), step)
        self.logged.append("val/mel_target")
        if self.synthesize and not self._failed and flow is not None:
            try:
                with torch.no_grad():
                    mel = synthesize_mel(flow, batch, pl_module.device)
            except Exception as err:  # a picture must never stop training
                log.warning("MelImageLogger: flow.inference failed (%s); logging targets only", err)
                self._failed = True  # rank 0 only: `synthesize` stays, so every rank keeps gathering alike
                return
            if mel is not None:
                writer.add_image("val/mel_flow", mel_to_image(mel, time_first=False), step)
                self.logged.append("val/mel_flow")


class SkippedDataLogger(pl.Callback):
    """Logs the datamodule's skipped-utterance counts (``datamodule.skipped``: reason -> count).

    Logged as ``data/skipped_<reason>`` and ``data/skipped_total`` every ``every_n_steps`` steps.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = max(1, int(every_n_steps))

    @staticmethod
    def counts(trainer: pl.Trainer) -> dict[str, int]:
        dm = getattr(trainer, "datamodule", None)
        skipped = getattr(dm, "skipped", None)
        if callable(skipped):
            skipped = skipped()
        return {str(k): int(v) for k, v in dict(skipped or {}).items()}

    def _log(self, trainer: pl.Trainer) -> None:
        counts = self.counts(trainer)
        if not counts:
            return
        metrics = {f"data/skipped_{k}": float(v) for k, v in counts.items()}
        metrics["data/skipped_total"] = float(sum(counts.values()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log(trainer)


class StepCheckpoint(ModelCheckpoint):
    """Checkpoints every ``every_n_train_steps`` AND when an epoch ends or ``max_steps`` stops the run.

    Lightning's ``ModelCheckpoint`` does one or the other; with only the step trigger, the final
    state of a run that stops between two triggers is lost, and a second ModelCheckpoint for the
    epoch end writes its own ``last-v1.ckpt``. One callback keeps a single ``last.ckpt`` that is
    always the newest state, which is what ``--ckpt_path last`` resumes from.

    Step saves are ``ModelCheckpoint``'s own; the extra save at an epoch end uses public API only
    (callback hooks, ``format_checkpoint_name``, ``trainer.save_checkpoint``,
    ``trainer.strategy.remove_checkpoint``, the ``best_model_path``/``last_model_path`` attributes),
    so it does not break on Lightning's private helpers anywhere in the range ``setup.cfg`` allows
    (tested on 2.4.0 and 2.6). It keeps every checkpoint (``save_top_k=-1``), the newest (1) or only
    ``last.ckpt`` (0); best-k by a metric is a plain ``ModelCheckpoint(monitor=...)`` beside it.
    """

    def __init__(self, every_n_train_steps: int = 1000, save_top_k: int = -1, **kwargs: Any) -> None:
        from cosytrain.errors import ConfigurationError

        if kwargs.get("monitor") is not None:
            raise ConfigurationError("StepCheckpoint saves by step, not by a metric; for the best k by "
                                     f"{kwargs['monitor']!r} add a lightning ModelCheckpoint with monitor beside it")
        if save_top_k not in (-1, 0, 1):
            raise ConfigurationError(f"StepCheckpoint save_top_k={save_top_k}: use -1 (keep all), 1 (the newest) or"
                                     " 0 (only last.ckpt)")
        kwargs.setdefault("save_last", True)
        super().__init__(every_n_train_steps=every_n_train_steps, save_top_k=save_top_k, **kwargs)
        self._saved_step: int | None = None  # global step whose state this callback saved last
        self._in_step_trigger = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_step_trigger = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_step_trigger = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._in_step_trigger:  # the step trigger above is saving right now
            self._saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == 0
                or self._saved_step == trainer.global_step):  # nothing new since the last save
            return
        self._save_epoch_end(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning >= 2.6 writes last.ckpt again here unless ITS last-save ran; after our epoch-end save
        # that second copy would record the epoch as finished and a mid-epoch resume would skip its rest
        if self._saved_step != trainer.global_step:
            super().on_train_end(trainer, pl_module)

    def _save_epoch_end(self, trainer: pl.Trainer) -> None:
        metrics = dict(trainer.callback_metrics)  # named like ModelCheckpoint names its own files
        for key, default in (("epoch", trainer.current_epoch), ("step", trainer.global_step)):
            value = metrics.get(key)
            metrics[key] = value.int() if isinstance(value, torch.Tensor) else torch.tensor(default)
        if self.save_top_k != 0:
            path = self.format_checkpoint_name(metrics)
            previous, self.best_model_path = self.best_model_path, path  # part of the state being saved
            trainer.save_checkpoint(path, self.save_weights_only)
            if self.save_top_k == 1 and previous and previous != path:
                trainer.strategy.remove_checkpoint(previous)
        if self.save_last:
            self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self._saved_step = trainer.global_step
