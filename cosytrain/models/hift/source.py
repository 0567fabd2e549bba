"""Neural-source-filter excitation: F0 (Hz per sample) -> harmonic sines + noise -> one source signal.

``SineGen`` is upstream's 22.05 kHz generator (v1): phase = cumulative sum over every sample.
``SineGen2`` is used at other rates (v2, v3): the per-sample frequency is averaged down to frame rate,
summed there and interpolated back up, which keeps float32 phase error small over long inputs.
Random draws (which generator, shape and order) follow upstream exactly so a seeded run reproduces
upstream's source. The phase and noise arithmetic always runs in float32 with autocast disabled.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.uniform import Uniform

from cosytrain.errors import ConfigurationError
from cosytrain.models.hift.layers import fp32_region

#: Length of v3's fixed noise tables: 300 s at 24 kHz (upstream hard-codes both numbers).
CAUSAL_NOISE_SAMPLES = 300 * 24000


def _uv(f0: torch.Tensor, threshold: float) -> torch.Tensor:
    return (f0 > threshold).to(torch.float32)


class SineGen(nn.Module):
    """Harmonic sines with a per-sample phase sum (upstream ``SineGen``, used at 22.05 kHz).

    Draws per call: the initial harmonic phases ``U(-pi, pi)`` of shape (B, H+1, 1) from the **CPU**
    generator (upstream samples a CPU ``Uniform`` and moves it), then ``randn`` (B, H+1, L) on f0's device.
    """

    def __init__(self, samp_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 noise_std: float = 0.003, voiced_threshold: float = 0) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold

    @torch.no_grad()
    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0 (B, L, 1) in Hz -> sine_waves (B, L, H+1), uv (B, L, 1), noise (B, L, H+1)."""
        with fp32_region(f0):
            f0 = f0.float().transpose(1, 2)  # (B, 1, L)
            batch = f0.size(0)
            harmonics = torch.arange(1, self.harmonic_num + 2, dtype=torch.float32, device=f0.device)
            f_mat = f0 * harmonics.view(1, -1, 1) / self.sampling_rate  # (B, H+1, L), cycles per sample
            theta_mat = 2 * math.pi * (torch.cumsum(f_mat, dim=-1) % 1)
            phase_vec = Uniform(low=-math.pi, high=math.pi).sample((batch, self.harmonic_num + 1, 1)).to(f0.device)
            phase_vec[:, 0, :] = 0
            sine_waves = self.sine_amp * torch.sin(theta_mat + phase_vec)
            uv = _uv(f0, self.voiced_threshold)
            noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
            noise = noise_amp * torch.randn_like(sine_waves)
            sine_waves = sine_waves * uv + noise
            return sine_waves.transpose(1, 2), uv.transpose(1, 2), noise.transpose(1, 2)


class SineGen2(nn.Module):
    """Harmonic sines with the phase summed at frame rate (upstream ``SineGen2``, 24 kHz).

    Draws per call (train, or non-causal eval): ``rand`` (B, H+1) initial phases, then ``randn``
    (B, L, H+1) noise, both on f0's device. With ``causal=True`` and eval mode it uses fixed uniform
    tables instead (``rand_ini`` (1, 9), ``sine_waves`` (1, 300*24000, 9)) drawn from the global torch
    RNG at construction as upstream does; they are non-persistent buffers, not in the state dict.
    """

    def __init__(self, samp_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 noise_std: float = 0.003, voiced_threshold: float = 0, flag_for_pulse: bool = False,
                 causal: bool = False) -> None:
        super().__init__()
        if flag_for_pulse:
            raise NotImplementedError("SineGen2: flag_for_pulse=True is unused by CosyVoice and not implemented")
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold
        self.flag_for_pulse = flag_for_pulse
        self.upsample_scale = int(upsample_scale)
        self.causal = causal
        if causal:
            if harmonic_num != 8:
                raise ConfigurationError(f"SineGen2(causal=True): upstream's fixed noise has 9 columns, so"
                                         f" nb_harmonics must be 8, got {harmonic_num}")
            rand_ini = torch.rand(1, 9)
            rand_ini[:, 0] = 0
            self.register_buffer("rand_ini", rand_ini, persistent=False)
            self.register_buffer("sine_waves", torch.rand(1, CAUSAL_NOISE_SAMPLES, 9), persistent=False)

    def _use_fixed_noise(self) -> bool:
        return self.causal and not self.training

    def _f02sine(self, f0_values: torch.Tensor) -> torch.Tensor:
        """f0_values (B, L, H+1) in Hz -> sines (B, L, H+1)."""
        rad_values = (f0_values / self.sampling_rate) % 1
        if self._use_fixed_noise():
            rand_ini = self.rand_ini.to(rad_values.device, torch.float32)
        else:
            rand_ini = torch.rand(f0_values.shape[0], f0_values.shape[2], device=f0_values.device)
            rand_ini[:, 0] = 0
        rad_values[:, 0, :] = rad_values[:, 0, :] + rand_ini
        scale = self.upsample_scale
        rad_values = F.interpolate(rad_values.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad_values, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale,
                              mode="nearest" if self.causal else "linear").transpose(1, 2)
        return torch.sin(phase)

    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0 (B, L, 1) in Hz -> sine_waves (B, L, H+1), uv (B, L, 1), noise (B, L, H+1)."""
        with fp32_region(f0):
            f0 = f0.float()
            harmonics = torch.arange(1, self.harmonic_num + 2, dtype=torch.float32, device=f0.device)
            fn = torch.multiply(f0, harmonics.view(1, 1, -1))
            sine_waves = self._f02sine(fn) * self.sine_amp
            uv = _uv(f0, self.voiced_threshold)
            noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
            if self._use_fixed_noise():
                table = self.sine_waves
                if sine_waves.shape[1] > table.shape[1]:
                    raise ValueError(f"SineGen2: input of {sine_waves.shape[1]} samples exceeds the fixed noise table ({table.shape[1]}); split it into chunks")
                noise = noise_amp * table[:, :sine_waves.shape[1]].to(sine_waves.device, torch.float32)
            else:
                noise = noise_amp * torch.randn_like(sine_waves)
            sine_waves = sine_waves * uv + noise
            return sine_waves, uv, noise


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: merges the H+1 sines into one excitation with Linear + tanh.

    Also draws (and returns) a noise-branch tensor after the sine generator, as upstream does; it is
    unused by the generator but consumes RNG, so it is kept to replay upstream's draw order.
    """

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshod: float = 0, sinegen_type: str = "1",
                 causal: bool = False) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen: nn.Module
        if sinegen_type == "1":
            self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshod)
        else:
            self.l_sin_gen = SineGen2(sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std,
                                      voiced_threshod, causal=causal)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()
        self.causal = causal
        self.uv: Optional[torch.Tensor]
        if causal:
            self.register_buffer("uv", torch.rand(1, CAUSAL_NOISE_SAMPLES, 1), persistent=False)
        else:
            self.uv = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: f0 per sample (B, L, 1) -> (sine_merge (B, L, 1), noise (B, L, 1), uv (B, L, 1))."""
        with torch.no_grad():
            sine_wavs, uv, _ = self.l_sin_gen(x)
        with fp32_region(sine_wavs):  # tiny layer; keeps the whole excitation in the weights' dtype (FP32)
            sine_merge = self.l_tanh(self.l_linear(sine_wavs.to(self.l_linear.weight.dtype)))
        if self.causal and not self.training:
            noise = self.uv[:, :uv.shape[1]].to(uv.device, uv.dtype) * self.sine_amp / 3
        else:
            noise = torch.randn_like(uv) * self.sine_amp / 3
        return sine_merge, noise, uv
