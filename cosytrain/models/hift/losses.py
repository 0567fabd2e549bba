"""HiFi-GAN losses as upstream CosyVoice combines them (``cosyvoice/hifigan/hifigan.py``,
``cosyvoice/utils/losses.py``, matcha's ``hifigan/models.py``).

Generator: ``loss_gen + fm_w * loss_fm + mel_w * loss_mel + tpr_w * loss_tpr + loss_f0`` with upstream's
weights mel 45, feature matching 2.0, TPR 1.0 (tau 0.04), F0 L1 1. Discriminator:
``loss_disc + tpr_w * loss_tpr + loss_f0`` (the F0 term has no gradient there - the generator ran
without grad - upstream adds it anyway, so the logged number matches upstream's).

Every loss is computed in FP32 (inputs cast with ``.float()``), also under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from cosytrain.data.features import mel_spectrogram

__all__ = [
    "discriminator_loss",
    "generator_loss",
    "feature_loss",
    "tpr_loss",
    "mel_loss",
    "MelConfig",
    "HiFiGanLoss",
]


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN: sum over sub-discriminators of mean((1 - D(real))^2) + mean(D(fake)^2)."""
    loss = torch.zeros((), device=real[0].device)
    for dr, dg in zip(real, fake):
        loss = loss + torch.mean((1 - dr.float()) ** 2) + torch.mean(dg.float() ** 2)
    return loss


def generator_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """LSGAN: sum over sub-discriminators of mean((1 - D(G(x)))^2)."""
    loss = torch.zeros((), device=fake[0].device)
    for dg in fake:
        loss = loss + torch.mean((1 - dg.float()) ** 2)
    return loss


def feature_loss(fmap_r: Sequence[Sequence[torch.Tensor]], fmap_g: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Sum of mean |real - generated| over every feature map, times 2.

    The factor 2 is matcha's; upstream then multiplies by ``feat_match_loss_weight`` (2.0) as well,
    so the effective weight is 4. Kept as upstream has it.
    """
    loss = torch.zeros((), device=fmap_r[0][0].device)
    for dr, dg in zip(fmap_r, fmap_g):
        for rl, gl in zip(dr, dg):
            loss = loss + torch.mean(torch.abs(rl.float() - gl.float()))
    return loss * 2


def tpr_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], tau: float) -> torch.Tensor:
    """Truncated pointwise relativistic loss (StyleTTS2 / upstream ``tpr_loss``).

    Per sub-discriminator: m = median(D(real) - D(fake)); L = mean((d - m)^2 over d < m) (elementwise
    ``dr < dg + m``); loss += tau - relu(tau - L). Deviation: when no element lies below the median
    (all differences equal) upstream's mean over an empty set is NaN, which would poison the whole
    step; here that sub-discriminator contributes tau - relu(tau - 0) = 0 instead.
    """
    loss = torch.zeros((), device=real[0].device)
    for dr, dg in zip(real, fake):
        dr, dg = dr.float(), dg.float()
        diff = dr - dg
        m_dg = torch.median(diff)
        mask = dr < dg + m_dg
        sq = (diff - m_dg) ** 2
        l_rel = torch.where(mask, sq, torch.zeros_like(sq)).sum() / mask.sum().clamp_min(1)
        loss = loss + (tau - F.relu(tau - l_rel))
    return loss


def mel_loss(real: torch.Tensor, generated: torch.Tensor,
             transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Sum over mel transforms of L1(mel(generated), mel(real)); the transforms run in FP32."""
    loss = torch.zeros((), device=real.device)
    for transform in transforms:
        loss = loss + F.l1_loss(transform(generated.float()), transform(real.float()))
    return loss


@dataclass
class MelConfig:
    """Upstream's ``mel_spec_transform1`` (the GAN mel loss): like ``feat_extractor`` but ``fmax`` None
    (full band) in every generation. v1: 1024/256/1024 at 22050 Hz; v2/v3: 1920/480/1920 at 24000 Hz."""

    n_fft: int = 1024
    num_mels: int = 80
    sampling_rate: int = 22050
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: Optional[float] = None
    center: bool = False

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return partial(mel_spectrogram, n_fft=self.n_fft, num_mels=self.num_mels, sampling_rate=self.sampling_rate,
                       hop_size=self.hop_size, win_size=self.win_size, fmin=self.fmin, fmax=self.fmax,
                       center=self.center)


class HiFiGanLoss:
    """The two halves of upstream ``HiFiGan.forward``'s loss, given the discriminator outputs.

    ``adversarial=False`` (discriminator warm-up) leaves out the generator's adversarial, feature
    matching and TPR terms: the generator then trains on mel + F0 reconstruction only, and the
    discriminator can be run without building a generator graph through it.
    """

    def __init__(self, mel: Sequence[MelConfig] | MelConfig = MelConfig(),
                 multi_mel_spectral_recon_loss_weight: float = 45.0, feat_match_loss_weight: float = 2.0,
                 tpr_loss_weight: float = 1.0, tpr_loss_tau: float = 0.04) -> None:
        mels = [mel] if isinstance(mel, MelConfig) else list(mel)
        self.mel_configs = mels
        self.mel_transforms = [m.transform() for m in mels]
        self.mel_weight = float(multi_mel_spectral_recon_loss_weight)
        self.fm_weight = float(feat_match_loss_weight)
        self.tpr_weight = float(tpr_loss_weight)
        self.tpr_tau = float(tpr_loss_tau)

    @staticmethod
    def f0_loss(generated_f0: torch.Tensor, pitch_feat: torch.Tensor) -> torch.Tensor:
        if generated_f0.shape != pitch_feat.shape:
            raise ValueError(f"F0 loss: generator f0 {list(generated_f0.shape)} vs batch pitch_feat "
                             f"{list(pitch_feat.shape)}; the data's hop_size must equal the vocoder's upsampling")
        return F.l1_loss(generated_f0.float(), pitch_feat.float())

    def generator(self, real: torch.Tensor, generated: torch.Tensor, generated_f0: torch.Tensor,
                  pitch_feat: torch.Tensor, disc: Optional[tuple] = None) -> dict[str, torch.Tensor]:
        """``disc`` = the discriminator's (y_d_rs, y_d_gs, fmap_rs, fmap_gs), or None during warm-up."""
        loss_mel = mel_loss(real, generated, self.mel_transforms)
        loss_f0 = self.f0_loss(generated_f0, pitch_feat)
        loss = self.mel_weight * loss_mel + loss_f0
        out = {"loss_mel": loss_mel, "loss_f0": loss_f0}
        if disc is not None:
            y_d_rs, y_d_gs, fmap_rs, fmap_gs = disc
            loss_gen = generator_loss(y_d_gs)
            loss_fm = feature_loss(fmap_rs, fmap_gs)
            loss_tpr = tpr_loss(y_d_rs, y_d_gs, self.tpr_tau) if self.tpr_weight != 0 else torch.zeros_like(loss)
            # same summation order as upstream
            loss = (loss_gen + self.fm_weight * loss_fm + self.mel_weight * loss_mel + self.tpr_weight * loss_tpr
                    + loss_f0)
            out.update(loss_gen=loss_gen, loss_fm=loss_fm, loss_tpr=loss_tpr)
        out["loss"] = loss
        return out

    def discriminator(self, disc: tuple, generated_f0: torch.Tensor,
                      pitch_feat: torch.Tensor) -> dict[str, torch.Tensor]:
        y_d_rs, y_d_gs, _, _ = disc
        loss_disc = discriminator_loss(y_d_rs, y_d_gs)
        loss_tpr = tpr_loss(y_d_rs, y_d_gs, self.tpr_tau) if self.tpr_weight != 0 else torch.zeros_like(loss_disc)
        loss_f0 = self.f0_loss(generated_f0, pitch_feat)
        loss = loss_disc + self.tpr_weight * loss_tpr + loss_f0
        return {"loss": loss, "loss_disc": loss_disc, "loss_tpr": loss_tpr, "loss_f0": loss_f0}
