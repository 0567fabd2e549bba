"""The vocoder task's configuration checks and defaults: upstream's ``train_conf_gan`` split into the two
optimizers' settings, the data-versus-vocoder rate check, and upstream's GAN mel transform."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.hift.losses import MelConfig
from cosytrain.tasks.optim import TrainConf

__all__ = ["split_gan_train_conf", "check_sample_rate", "datamodule_value", "default_mel_loss_config"]

_GAN_ONLY_KEYS = {"optim_d", "optim_conf_d", "scheduler_d", "scheduler_conf_d"}


def split_gan_train_conf(conf: Mapping[str, Any] | None) -> tuple[TrainConf, TrainConf]:
    """Upstream ``train_conf_gan`` -> (generator conf, discriminator conf).

    ``optim``/``optim_conf``/``scheduler``/``scheduler_conf`` are the generator's; the same names with
    ``_d`` the discriminator's (defaulting to the generator's); ``grad_clip`` applies to both.
    Upstream's defaults: adam, lr 2e-4, constantlr, grad_clip 5. ``accum_grad`` must be 1 (upstream
    says the same for GAN training).
    """
    conf = dict(conf or {})
    accum = int(conf.pop("accum_grad", 1))
    if accum != 1:
        raise ConfigurationError(f"train_conf.accum_grad={accum}: GAN training steps both optimizers every batch; set"
                                 f" it to 1")
    gen = {"optim": "adam", "optim_conf": {"lr": 0.0002}, "scheduler": "constantlr", "scheduler_conf": {},
           "grad_clip": 5.0}
    for key in list(conf):
        if key not in _GAN_ONLY_KEYS:
            gen[key] = conf.pop(key)
    disc = {"optim": conf.pop("optim_d", gen["optim"]), "optim_conf": conf.pop("optim_conf_d", gen["optim_conf"]),
            "scheduler": conf.pop("scheduler_d", gen["scheduler"]),
            "scheduler_conf": conf.pop("scheduler_conf_d", gen.get("scheduler_conf", {})),
            "grad_clip": gen["grad_clip"]}
    return TrainConf.from_dict(gen), TrainConf.from_dict(disc)


def check_sample_rate(model_rate: int, data_rate: Optional[int], model_hop: Optional[int] = None,
                      data_hop: Optional[int] = None) -> None:
    """One-line error when the data's audio rate or mel hop does not fit the vocoder."""
    if data_rate is not None and int(data_rate) != int(model_rate):
        raise ConfigurationError(f"sample rate mismatch: the data is {int(data_rate)} Hz but the vocoder"
                                 f" (hift.sampling_rate) is {int(model_rate)} Hz; set data.init_args.sample_rate:"
                                 f" {int(model_rate)} or use a {int(data_rate)} Hz vocoder config")
    if model_hop is not None and data_hop is not None and int(model_hop) != int(data_hop):
        raise ConfigurationError(f"hop size mismatch: the data's mel hop_size is {int(data_hop)} samples but the"
                                 f" vocoder makes {int(model_hop)} samples per frame; set data.init_args.hop_size:"
                                 f" {int(model_hop)}")


def datamodule_value(dm: Any, name: str) -> Any:
    hp = getattr(dm, "hparams", None)
    if hp is not None and name in hp:
        return hp[name]
    return getattr(dm, name, None)


def default_mel_loss_config(hift: nn.Module) -> MelConfig:
    """Upstream's GAN mel transform for this vocoder: hop = its samples per frame, n_fft = win = 4 hops
    (v1 1024/256, v2/v3 1920/480), full band (fmax None)."""
    hop = int(getattr(hift, "upsample_scale", 256))
    return MelConfig(n_fft=4 * hop, num_mels=80, sampling_rate=int(getattr(hift, "sampling_rate", 22050)),
                     hop_size=hop, win_size=4 * hop, fmin=0.0, fmax=None, center=False)
