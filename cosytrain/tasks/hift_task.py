"""``HiFTTask``: GAN training of the HiFT vocoder the way upstream's ``train_one_epoc_gan`` does it.

Each training batch takes two optimizer steps, discriminator first (upstream ``batch['turn']``
order): the generator runs without grad, the discriminator learns real vs generated; then the
generator runs again (fresh source noise, as upstream's second forward) and learns from the updated
discriminator. Losses: ``cosytrain.models.hift.losses`` (upstream ``HiFiGan`` weights). During
``discriminator_warmup_steps`` the generator gets no adversarial/feature-matching/TPR terms (mel +
F0 only) while the discriminator already trains.

Checkpoint keys are ``hift.*`` (the generator) and ``discriminator.*``; reading and writing them is
:mod:`cosytrain.tasks.hift_weights`.

Precision is owned by this task, not by Lightning's precision plugin: with two optimizers the single
scaler of Lightning's AMP plugin would couple them (an overflow in one would shrink the other's loss
scale), so ``16-mixed`` here means FP16 autocast with TWO ``torch.amp.GradScaler`` (one per
optimizer) on whatever device runs, CPU included; ``bf16-mixed`` BF16 autocast without scaler;
``32-true`` neither. The precision is read from ``precision`` (this task's argument) or, when that
is None, from the trainer (``trainer.precision``, normally cosytrain's plugin); a mixed-precision
plugin on the trainer is then replaced by Lightning's plain FP32 plugin at ``setup`` so that
autocast and scaling are not applied twice. Per optimizer: scale -> backward -> unscale -> clip
(``grad_clip``) -> a step whose grad norm is not finite is skipped and counted -> scaler update
(lowers that scaler's scale after an overflow) -> lr schedule step (always, as upstream). Both
scalers are saved in and restored from the checkpoint. A plain Lightning ``Trainer(precision=
'16-mixed')`` on CPU has already become BF16 before the task can see it: use cosytrain's trainer
(``build_trainer``/the CLI) or set this task's ``precision``. DeepSpeed is refused; for DDP use
``ddp_find_unused_parameters_true`` (the generator is unused in the discriminator step).

``trainer.global_step`` counts batches (generator steps): the discriminator steps on the raw
torch optimizer so Lightning does not count it a second time.

Randomness: the NSF source draws noise from the global torch RNG in every generator forward. With
``step_seed`` set, that RNG is re-seeded from (step_seed, global_step, rank) at the start of each
batch, so a run resumed from a checkpoint draws the same noise as an uninterrupted one and DDP ranks
draw different noise.

Mel source: ``mel_source='ground_truth'`` (upstream) trains on the data's mels; ``'flow'`` on mels a
trained, frozen flow generates (:mod:`cosytrain.tasks.flow_mel_source`). The frozen flow is outside the
module tree, so it follows the module's device in every stage's start hook (fit, validate, test,
predict), not only in ``on_fit_start``.

F0 targets: the data's ``pitch_feat`` come from ``cosytrain.data.features.compute_f0``, which is
upstream's pyworld (harvest + stonemask) when pyworld is importable and a YIN stand-in otherwise.
The backend is logged (console, TensorBoard text ``data/f0_backend``, hparams). Fine-tuning
pretrained weights (``init_from``) toward the stand-in's different F0 would silently move the
official F0 predictor, so it is refused unless ``allow_yin_f0_stand_in: true``; install the
``vocoder`` extra (``pip install 'cosytrain[vocoder]'``, pyworld wheels) for the exact targets.

``init_from`` is read when the run is set up and not when it resumes from a checkpoint
(``cosytrain.tasks.init_from``).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.modeldir import check_state_dict
from cosytrain.models.hift.discriminator import (MultiPeriodDiscriminator, MultipleDiscriminator,
                                                 MultiResSpecDiscriminator)
from cosytrain.models.hift.losses import HiFiGanLoss, MelConfig
from cosytrain.tasks.flow_mel_source import FlowMelSource
from cosytrain.tasks.hift_config import (check_sample_rate, datamodule_value, default_mel_loss_config,
                                         split_gan_train_conf)
from cosytrain.tasks.hift_weights import read_init_weights
from cosytrain.tasks.init_from import InitFrom
from cosytrain.tasks.optim import build_optimizer, build_scheduler
from cosytrain.tasks.precision import normalize_precision

log = logging.getLogger(__name__)

__all__ = ["HiFTTask", "check_sample_rate", "split_gan_train_conf", "default_mel_loss_config"]

_STEP_SEED_MOD = 2**62


def _norm(params: Sequence[nn.Parameter], clip: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)


# ------------------------------------------------------------------------------------------------ task


class HiFTTask(pl.LightningModule):
    """Trains a HiFT generator against upstream's discriminators (see the module docstring).

    Args:
        hift: the generator (``HiFTGenerator``/``CausalHiFTGenerator``; ``forward(batch, device) -> (speech, f0)``).
        discriminator: upstream's ``MultipleDiscriminator``; None builds the official one
            (MultiPeriodDiscriminator + MultiResSpecDiscriminator).
        train_conf: upstream's ``train_conf_gan`` optimisation keys (``optim``, ``optim_conf``,
            ``scheduler``, ``scheduler_conf``, ``optim_d``, ``optim_conf_d``, ``scheduler_d``,
            ``scheduler_conf_d``, ``grad_clip``, ``accum_grad`` = 1).
        mel_loss: the GAN mel transform(s) (``MelConfig`` keys); None = upstream's for this vocoder.
        multi_mel_spectral_recon_loss_weight, feat_match_loss_weight, tpr_loss_weight, tpr_loss_tau:
            upstream ``HiFiGan`` loss weights (defaults 45, 2.0, 1.0, 0.04).
        discriminator_warmup_steps: for this many first steps the generator gets no adversarial loss.
        precision: ``16-mixed``/``bf16-mixed``/``32-true``; None = the trainer's precision.
        grad_scaler_init_scale: initial loss scale of both FP16 scalers.
        init_from: weights only, before training: an upstream model directory (its ``hift.pt``: the
            generator), an upstream ``HiFiGan`` checkpoint file (``generator.*`` + ``discriminator.*``)
            or a HiFTTask Lightning checkpoint (``hift.*`` + ``discriminator.*``); strict, shape-checked.
        mel_source: ``ground_truth`` (upstream) or ``flow`` (mels of the frozen flow in ``flow_dir``).
        flow_dir: model directory whose ``flow.pt`` makes the mels for ``mel_source='flow'``.
        step_seed: re-seed the global torch RNG per batch from (step_seed, step, rank); None = never.
        log_media_every_n_steps: audio samples and mel images to TensorBoard every N steps (0 = off);
            validation logs its first batch every time.
        allow_yin_f0_stand_in: train from ``init_from`` weights even though pyworld is missing and the
            F0 targets come from the YIN stand-in (see the module doc); default False refuses that.
    """

    def __init__(
        self,
        hift: nn.Module,
        discriminator: Optional[nn.Module] = None,
        train_conf: Optional[dict[str, Any]] = None,
        mel_loss: Optional[dict[str, Any] | list[dict[str, Any]]] = None,
        multi_mel_spectral_recon_loss_weight: float = 45.0,
        feat_match_loss_weight: float = 2.0,
        tpr_loss_weight: float = 1.0,
        tpr_loss_tau: float = 0.04,
        discriminator_warmup_steps: int = 0,
        precision: Optional[str] = None,
        grad_scaler_init_scale: float = 2.0**16,
        init_from: Optional[str] = None,
        mel_source: str = "ground_truth",
        flow_dir: Optional[str] = None,
        step_seed: Optional[int] = 1234,
        log_media_every_n_steps: int = 500,
        allow_yin_f0_stand_in: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["hift", "discriminator"])
        self.automatic_optimization = False
        self.hift = hift
        self.discriminator = discriminator if discriminator is not None else MultipleDiscriminator(
            MultiPeriodDiscriminator(), MultiResSpecDiscriminator())
        self.conf_g, self.conf_d = split_gan_train_conf(train_conf)
        if mel_loss is None:
            mels = [default_mel_loss_config(hift)]
        else:
            mels = [MelConfig(**m) for m in (mel_loss if isinstance(mel_loss, list) else [mel_loss])]
        self.loss = HiFiGanLoss(mels, multi_mel_spectral_recon_loss_weight, feat_match_loss_weight, tpr_loss_weight,
                                tpr_loss_tau)
        self.warmup_steps = int(discriminator_warmup_steps)
        if precision is not None and normalize_precision(precision) is None:
            raise ConfigurationError(f"precision={precision!r}: use '16-mixed', 'bf16-mixed' or '32-true'")
        self.requested_precision = normalize_precision(precision) if precision is not None else None
        self.run_precision: str = self.requested_precision or "32-true"
        self.init_scale = float(grad_scaler_init_scale)
        if mel_source not in ("ground_truth", "flow"):
            raise ConfigurationError(f"mel_source={mel_source!r}: use 'ground_truth' or 'flow'")
        if mel_source == "flow" and not flow_dir:
            raise ConfigurationError("mel_source='flow' needs flow_dir: a model directory holding the trained flow.pt")
        self.mel_source = mel_source
        # a tuple keeps the frozen flow out of the module tree (not trained, not checkpointed, not exported)
        self._flow_source: tuple[FlowMelSource, ...] = (FlowMelSource.from_model_dir(flow_dir),) if flow_dir and \
            mel_source == "flow" else ()
        self.step_seed = step_seed
        self.log_media_every = int(log_media_every_n_steps)
        self.scalers: dict[str, Optional[torch.amp.GradScaler]] = {"generator": None, "discriminator": None}
        self._pending_scalers: Optional[dict[str, Any]] = None
        self.skipped_steps = {"generator": 0, "discriminator": 0}
        self.last_grad_norm: dict[str, float] = {}
        self.last_step_taken: dict[str, bool] = {}
        self._init_from = InitFrom(init_from, self.load_init_weights)
        self.allow_yin_f0_stand_in = bool(allow_yin_f0_stand_in)
        self.f0_backend: Optional[str] = None

    # ------------------------------------------------------------------ weights
    def load_init_weights(self, init_from: str | Path) -> None:
        """Load ``init_from`` (see the class doc) strictly after a shape check; one-line errors."""
        gen, disc, what = read_init_weights(init_from)
        check_state_dict(self.hift, gen, f"init_from {what} (generator)", model_what="the task's hift")
        self.hift.load_state_dict(gen, strict=True)
        if disc:
            check_state_dict(self.discriminator, disc, f"init_from {what} (discriminator)",
                             model_what="the task's discriminator")
            self.discriminator.load_state_dict(disc, strict=True)
        log.info("init_from %s: generator%s loaded", what, " and discriminator" if disc else "")

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        opt_g = build_optimizer([p for p in self.hift.parameters() if p.requires_grad], self.conf_g)
        opt_d = build_optimizer([p for p in self.discriminator.parameters() if p.requires_grad], self.conf_d)
        sched_g, sched_d = build_scheduler(opt_g, self.conf_g), build_scheduler(opt_d, self.conf_d)
        # stepped by training_step itself (manual optimisation); listed so Lightning checkpoints them
        return ({"optimizer": opt_g, "lr_scheduler": {"scheduler": sched_g, "interval": "step"}},
                {"optimizer": opt_d, "lr_scheduler": {"scheduler": sched_d, "interval": "step"}})

    def _resolve_precision(self) -> None:
        """Take over precision from the trainer (see module doc); one-line errors for what we cannot own."""
        strategy = self.trainer.strategy
        plugin = strategy.precision_plugin
        if isinstance(plugin, MixedPrecision):
            trainer_precision = normalize_precision(plugin.precision)
        elif type(plugin) is Precision:
            trainer_precision = "32-true"
        else:
            raise ConfigurationError(f"HiFTTask owns its precision and cannot run with trainer precision plugin "
                                     f"{type(plugin).__name__}; use trainer.precision 16-mixed, bf16-mixed or 32-true")
        if "deepspeed" in type(strategy).__name__.lower():
            raise ConfigurationError("HiFTTask (two optimizers, manual optimisation) does not support DeepSpeed; use"
                                     " ddp")
        wanted = self.requested_precision
        if wanted is not None and trainer_precision != "32-true" and trainer_precision != wanted:
            raise ConfigurationError(f"precision set twice: model.init_args.precision={wanted} but trainer.precision="
                                     f"{trainer_precision}; set only one")
        self.run_precision = wanted or trainer_precision or "32-true"
        if isinstance(plugin, MixedPrecision):
            strategy.precision_plugin = Precision()  # autocast + scalers are ours (module doc)

    def _check_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        check_sample_rate(int(getattr(self.hift, "sampling_rate")), datamodule_value(dm, "sample_rate"),
                          getattr(self.hift, "upsample_scale", None), datamodule_value(dm, "hop_size"))
        if datamodule_value(dm, "vocoder") is False:
            raise ConfigurationError("HiFTTask needs vocoder batches (speech, pitch_feat): set"
                                     " data.init_args.vocoder: true")

    def _check_f0_backend(self) -> None:
        from cosytrain.tasks.f0_backend import check_f0_backend

        self.f0_backend = check_f0_backend(self.hparams.get("init_from"), self.allow_yin_f0_stand_in)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._check_data()
            self._check_f0_backend()  # before init_from is read: refusing costs nothing then
        self._init_from.on_setup(self.trainer)
        self._resolve_precision()  # validate/test too: the trainer's plugin must not autocast on top of ours

    def _log_f0_backend(self) -> None:
        from cosytrain.tasks.f0_backend import log_f0_backend

        log_f0_backend(self.trainer, self.f0_backend, int(self.global_step))

    def _flow_to_device(self) -> None:
        """The frozen flow is outside the module tree: move it with the module, in every stage."""
        for source in self._flow_source:
            source.to(self.device)

    def load_init_from(self) -> None:
        """Read ``init_from`` now (the trainer does it at setup unless the run resumes)."""
        self._init_from.load_now()

    def on_fit_start(self) -> None:
        device = self.device.type
        for name in self.scalers:
            scaler = None
            if self.run_precision == "16-mixed":
                scaler = torch.amp.GradScaler(device=device, init_scale=self.init_scale)
                pending = (self._pending_scalers or {}).get(name)
                if pending:
                    scaler.load_state_dict(pending)
            self.scalers[name] = scaler
        self._pending_scalers = None
        self._flow_to_device()
        self._log_f0_backend()

    def on_train_start(self) -> None:
        self._init_from.after_restore(self.trainer)

    def on_validation_start(self) -> None:
        self._init_from.after_restore(self.trainer)
        self._flow_to_device()  # `validate` never runs on_fit_start

    def on_test_start(self) -> None:
        self._init_from.after_restore(self.trainer)
        self._flow_to_device()

    def on_predict_start(self) -> None:
        self._init_from.after_restore(self.trainer)
        self._flow_to_device()

    def autocast(self):
        """The autocast context of this run's precision (nothing for 32-true)."""
        if self.run_precision == "16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        if self.run_precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.step_seed is not None:
            seed = int(self.step_seed) * 1_000_003 + int(self.global_step) * 7_919 + int(self.global_rank)
            torch.manual_seed(seed % _STEP_SEED_MOD)

    def input_mels(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch the generator sees: ground-truth mels, or the frozen flow's."""
        if "speech" not in batch or "pitch_feat" not in batch:
            raise ConfigurationError("HiFTTask: the batch lacks 'speech'/'pitch_feat'; set data.init_args.vocoder:"
                                     " true")
        if self.mel_source == "flow":
            return {**batch, "speech_feat": self._flow_source[0](batch, self.device)}
        return dict(batch)

    def _real(self, batch: Mapping[str, Any], generated: torch.Tensor) -> torch.Tensor:
        real = batch["speech"].to(self.device)
        if real.shape != generated.shape:
            raise ConfigurationError(f"generated speech {list(generated.shape)} vs batch speech {list(real.shape)}:"
                                     " the data's hop_size must equal the vocoder's samples per frame"
                                     f" ({getattr(self.hift, 'upsample_scale', '?')})")
        return real

    def _step(self, name: str, loss: torch.Tensor, optimizer: Any, scheduler: Any, params: list[nn.Parameter],
              clip: float, count_step: bool) -> None:
        """scale -> backward -> unscale -> clip -> skip if not finite -> step -> scaler update -> lr step."""
        scaler = self.scalers[name]
        raw = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        raw.zero_grad(set_to_none=True)
        self.manual_backward(scaler.scale(loss) if scaler is not None else loss)
        if scaler is not None:
            scaler.unscale_(raw)
        norm = float(_norm(params, clip))
        finite = math.isfinite(norm)
        if not finite:
            raw.zero_grad(set_to_none=True)  # Adam(W) leaves parameters and state alone without grads
            self.skipped_steps[name] += 1
        if count_step:
            optimizer.step()  # LightningOptimizer: advances trainer.global_step
        else:
            raw.step()
        if scaler is not None:
            scaler.update()  # lowers the scale when unscale_ found an inf/nan
        raw.zero_grad(set_to_none=True)
        scheduler.step()
        self.last_grad_norm[name] = norm
        self.last_step_taken[name] = finite

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        gen_batch = self.input_mels(batch)
        pitch = batch["pitch_feat"].to(self.device)
        bs = int(batch["speech"].shape[0])
        adversarial = self.global_step >= self.warmup_steps
        self.log("step", float(self.global_step + 1), on_step=True, on_epoch=False, batch_size=1)

        # 1. discriminator (generator without grad), as upstream's 'discriminator' turn
        with self.autocast():
            with torch.no_grad():
                fake, f0 = self.hift(gen_batch, self.device)
            real = self._real(batch, fake)
            disc = self.discriminator(real, fake.detach())
            d_out = self.loss.discriminator(disc, f0, pitch)
        self.compute_dtype = disc[1][0].dtype
        self._step("discriminator", d_out["loss"], opt_d, sched_d, list(self.discriminator.parameters()),
                   self.conf_d.grad_clip, count_step=False)

        # 2. generator; the discriminator's parameters are frozen meanwhile (no wasted grads)
        self.toggle_optimizer(opt_g)
        try:
            with self.autocast():
                fake, f0 = self.hift(gen_batch, self.device)
                disc_g = self.discriminator(real, fake) if adversarial else None
                g_out = self.loss.generator(real, fake, f0, pitch, disc_g)
            self._step("generator", g_out["loss"], opt_g, sched_g, list(self.hift.parameters()), self.conf_g.grad_clip,
                       count_step=True)
        finally:
            self.untoggle_optimizer(opt_g)

        self._log_train(d_out, g_out, bs, opt_g, opt_d)
        if self.log_media_every > 0 and self.global_step % self.log_media_every == 0:
            self._log_media("train", real, fake, gen_batch)

    def _log_train(self, d_out: dict, g_out: dict, bs: int, opt_g: Any, opt_d: Any) -> None:
        for prefix, out in (("train/d_", d_out), ("train/g_", g_out)):
            for key, value in out.items():
                self.log(prefix + key, value.detach().float(), batch_size=bs, prog_bar=key == "loss")
        for name, norm in self.last_grad_norm.items():
            self.log(f"train/grad_norm_{name}", norm if math.isfinite(norm) else float("nan"), batch_size=bs)
        for name, count in self.skipped_steps.items():
            self.log(f"train/skipped_steps_{name}", float(count), batch_size=bs)
        for name, scaler in self.scalers.items():
            if scaler is not None:
                self.log(f"train/loss_scale_{name}", float(scaler.get_scale()), batch_size=bs)
        self.log("train/lr_generator", opt_g.param_groups[0]["lr"], batch_size=bs)
        self.log("train/lr_discriminator", opt_d.param_groups[0]["lr"], batch_size=bs)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        gen_batch = self.input_mels(batch)
        with self.autocast():
            fake, f0 = self.hift(gen_batch, self.device)
        real = self._real(batch, fake)
        out = self.loss.generator(real, fake, f0, batch["pitch_feat"].to(self.device), None)
        bs = int(batch["speech"].shape[0])
        self.log("step", float(self.global_step), on_step=False, on_epoch=True, batch_size=1)
        for key, value in out.items():
            self.log(f"val/{key}", value.detach().float(), batch_size=bs, sync_dist=True, prog_bar=key == "loss_mel")
        if batch_idx == 0:
            self._log_media("val", real, fake, gen_batch)
        return out["loss"]

    # ------------------------------------------------------------------ media
    def _log_media(self, stage: str, real: torch.Tensor, fake: torch.Tensor, gen_batch: Mapping[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from cosytrain.tasks.callbacks import _tensorboard, mel_to_image

        writer = _tensorboard(trainer)
        if writer is None:
            return
        step = int(self.global_step)
        rate = int(getattr(self.hift, "sampling_rate", 22050))
        writer.add_audio(f"{stage}/audio_generated", fake[0].detach().float().clamp(-1, 1).cpu(), step, rate)
        writer.add_audio(f"{stage}/audio_real", real[0].detach().float().clamp(-1, 1).cpu(), step, rate)
        transform = self.loss.mel_transforms[0]
        with torch.no_grad():
            for name, wav in (("mel_real", real), ("mel_generated", fake)):
                writer.add_image(f"{stage}/{name}", mel_to_image(transform(wav[:1].float())[0], time_first=False), step)
        writer.add_image(f"{stage}/mel_input", mel_to_image(gen_batch["speech_feat"][0].float()), step)

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hift_task"] = {
            "precision": self.run_precision,
            "scalers": {name: (s.state_dict() if s is not None else None) for name, s in self.scalers.items()},
            "skipped_steps": dict(self.skipped_steps),
            "f0_backend": self.f0_backend,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._init_from.on_restored()
        extra = checkpoint.get("hift_task", {})
        self.skipped_steps.update({k: int(v) for k, v in extra.get("skipped_steps", {}).items()})
        scalers = {k: v for k, v in (extra.get("scalers") or {}).items() if v}
        if scalers:
            # applied in on_fit_start, once the scalers exist on the right device
            self._pending_scalers = scalers
            for name, scaler in self.scalers.items():
                if scaler is not None and scalers.get(name):
                    scaler.load_state_dict(scalers[name])
