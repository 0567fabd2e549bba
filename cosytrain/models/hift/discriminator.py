"""HiFi-GAN discriminators used by upstream CosyVoice to train the HiFT vocoder.

Upstream's ``hifigan`` config builds ``MultipleDiscriminator(mpd=matcha MultiPeriodDiscriminator,
mrd=cosyvoice MultiResSpecDiscriminator)``. Module and parameter names here are upstream's, so the
``discriminator.*`` keys of an upstream ``HiFiGan`` checkpoint load strictly:

* ``mpd.discriminators.<i>.convs.<j>.{bias,weight_g,weight_v}`` and ``...conv_post.*``: matcha wraps
  these convs with the *deprecated* ``torch.nn.utils.weight_norm``, whose keys are ``weight_g`` /
  ``weight_v``. :class:`LegacyWeightNormConv2d` stores exactly those two parameters (no forward hook,
  so the module can be deep-copied and compiled) and also accepts the newer parametrization names.
* ``mrd.discriminators.<i>.discriminators.<j>.*`` and ``...out.*``: CosyVoice uses
  ``torch.nn.utils.parametrizations.weight_norm``, keys ``parametrizations.weight.original0`` (g) /
  ``original1`` (v); torch's own load hook still accepts the old ``weight_g``/``weight_v`` names that
  upstream's older discriminator file produced.

Precision: the STFT magnitudes of the spectral discriminators are computed in FP32 with autocast
off (FP16 STFT loses the low-level bins); the conv stacks follow autocast.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.hift.layers import fp32_region, get_padding
from cosytrain.models.hift.weight_norm import weight_norm

__all__ = [
    "LegacyWeightNormConv2d",
    "DiscriminatorP",
    "MultiPeriodDiscriminator",
    "SpecDiscriminator",
    "MultiResSpecDiscriminator",
    "MultipleDiscriminator",
    "DiscOutputs",
]

LRELU_SLOPE = 0.1

# (real scores, generated scores, real feature maps, generated feature maps), one entry per sub-discriminator
DiscOutputs = Tuple[List[torch.Tensor], List[torch.Tensor], List[List[torch.Tensor]], List[List[torch.Tensor]]]

_PARAMETRIZED = ("parametrizations.weight.original0", "parametrizations.weight.original1")
_LEGACY = ("weight_g", "weight_v")


class LegacyWeightNormConv2d(nn.Conv2d):
    """Conv2d with weight = g * v / ||v|| stored as ``weight_g`` / ``weight_v`` (old torch weight_norm).

    Initialised as ``torch.nn.utils.weight_norm`` does: v = the default-initialised weight, g = its
    norm over every dim but 0. A state dict saved with the parametrization names loads too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        weight = self.weight.detach()
        del self.weight
        self.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, 0).clone())
        self.weight_v = nn.Parameter(weight.clone())
        self._register_load_state_dict_pre_hook(self._rename_parametrized_keys)

    @staticmethod
    def _rename_parametrized_keys(state_dict: dict, prefix: str, *args: Any) -> None:
        for new, old in zip(_LEGACY, _PARAMETRIZED):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class DiscriminatorP(nn.Module):
    """HiFi-GAN period discriminator: the waveform folded into (L/period, period) and 2-D convs over time.

    ``channels`` defaults to HiFi-GAN's (32, 128, 512, 1024, 1024); smaller values make test/demo sizes.
    """

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3,
                 channels: Sequence[int] = (32, 128, 512, 1024, 1024)) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ConfigurationError(f"DiscriminatorP: channels needs 5 entries (one per conv), got {list(channels)}")
        self.period = int(period)
        pad = (get_padding(5, 1), 0)  # upstream pads for kernel 5 whatever kernel_size is
        ins = [1] + list(channels[:-1])
        layers = [LegacyWeightNormConv2d(ins[i], channels[i], (kernel_size, 1), (stride, 1), padding=pad)
                  for i in range(4)]
        layers.append(LegacyWeightNormConv2d(channels[3], channels[4], (kernel_size, 1), 1, padding=(2, 0)))
        self.convs = nn.ModuleList(layers)
        self.conv_post = LegacyWeightNormConv2d(channels[4], 1, (3, 1), 1, padding=(1, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 1, L) -> (scores (B, N), feature maps)."""
        fmap = []
        b, c, t = x.shape
        if t % self.period != 0:
            n_pad = self.period - (t % self.period)
            x = F.pad(x, (0, n_pad), "reflect")
            t = t + n_pad
        x = x.view(b, c, t // self.period, self.period)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


def _pairs(discriminators: nn.ModuleList, y: torch.Tensor, y_hat: torch.Tensor) -> DiscOutputs:
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = [], [], [], []
    for d in discriminators:
        y_d_r, fmap_r = d(y)
        y_d_g, fmap_g = d(y_hat)
        y_d_rs.append(y_d_r)
        fmap_rs.append(fmap_r)
        y_d_gs.append(y_d_g)
        fmap_gs.append(fmap_g)
    return y_d_rs, y_d_gs, fmap_rs, fmap_gs


class MultiPeriodDiscriminator(nn.Module):
    """matcha's ``MultiPeriodDiscriminator``: periods 2, 3, 5, 7, 11 (arguments only for small test sizes)."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11),
                 channels: Sequence[int] = (32, 128, 512, 1024, 1024)) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p, channels=channels) for p in periods])

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> DiscOutputs:
        """Real and generated (B, 1, L)."""
        return _pairs(self.discriminators, y, y_hat)


def stft_magnitude(x: torch.Tensor, fft_size: int, hop_size: int, win_length: int,
                   window: torch.Tensor) -> torch.Tensor:
    """(B, L) -> |STFT| (B, frames, fft_size//2+1), centred with reflect padding (torch.stft defaults), FP32."""
    with fp32_region(x):
        spec = torch.stft(x.float(), fft_size, hop_size, win_length, window.float(), return_complex=True)
        return torch.abs(spec).transpose(2, 1)


class SpecDiscriminator(nn.Module):
    """2-D convs over one STFT magnitude resolution (UnivNet-style); upstream's ``SpecDiscriminator``."""

    def __init__(self, fft_size: int = 1024, shift_size: int = 120, win_length: int = 600,
                 window: str = "hann_window", channels: int = 32) -> None:
        super().__init__()
        if window not in ("hann_window", "hamming_window", "blackman_window", "bartlett_window"):
            raise ConfigurationError(f"SpecDiscriminator: window {window!r} is not a torch window function name")
        self.fft_size = fft_size
        self.shift_size = shift_size
        self.win_length = win_length
        # upstream keeps the window as a plain attribute: never in the state dict
        self.register_buffer("window", getattr(torch, window)(win_length), persistent=False)
        c = channels
        self.discriminators = nn.ModuleList([
            weight_norm(nn.Conv2d(1, c, kernel_size=(3, 9), padding=(1, 4))),
            weight_norm(nn.Conv2d(c, c, kernel_size=(3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(c, c, kernel_size=(3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(c, c, kernel_size=(3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(c, c, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))),
        ])
        self.out = weight_norm(nn.Conv2d(c, 1, 3, 1, 1))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, L) or (B, 1, L) -> (scores (B, N), feature maps)."""
        fmap = []
        if y.dim() == 3:
            y = y.squeeze(1)
        y = stft_magnitude(y, self.fft_size, self.shift_size, self.win_length, self.window).unsqueeze(1)
        for conv in self.discriminators:
            y = F.leaky_relu(conv(y), LRELU_SLOPE)
            fmap.append(y)
        y = self.out(y)
        fmap.append(y)
        return torch.flatten(y, 1, -1), fmap


class MultiResSpecDiscriminator(nn.Module):
    """Three :class:`SpecDiscriminator` resolutions (upstream defaults: fft 1024/2048/512, hop 120/240/50,
    window 600/1200/240)."""

    def __init__(self, fft_sizes: Sequence[int] = (1024, 2048, 512), hop_sizes: Sequence[int] = (120, 240, 50),
                 win_lengths: Sequence[int] = (600, 1200, 240), window: str = "hann_window",
                 channels: int = 32) -> None:
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ConfigurationError("MultiResSpecDiscriminator: fft_sizes, hop_sizes and win_lengths need equal"
                                     " lengths")
        self.discriminators = nn.ModuleList([
            SpecDiscriminator(f, h, w, window, channels=channels) for f, h, w in zip(fft_sizes, hop_sizes, win_lengths)
        ])

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> DiscOutputs:
        """Real and generated (B, L)."""
        return _pairs(self.discriminators, y, y_hat)


class MultipleDiscriminator(nn.Module):
    """Runs ``mpd`` on (B, 1, L) and ``mrd`` on (B, L) and concatenates their outputs (upstream order)."""

    def __init__(self, mpd: nn.Module, mrd: nn.Module) -> None:
        super().__init__()
        self.mpd = mpd
        self.mrd = mrd

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> DiscOutputs:
        """Real and generated waveforms (B, L)."""
        y_d_rs, y_d_gs, fmap_rs, fmap_gs = self.mpd(y.unsqueeze(1), y_hat.unsqueeze(1))
        more = self.mrd(y, y_hat)
        return y_d_rs + more[0], y_d_gs + more[1], fmap_rs + more[2], fmap_gs + more[3]
