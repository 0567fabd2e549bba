"""HiFT vocoder generator (HiFTNet: neural source filter + iSTFTNet) for CosyVoice 1/2 (and v3's causal one).

Upstream: ``cosyvoice/hifigan/generator.py`` ``HiFTGenerator`` / ``CausalHiFTGenerator``. Same
constructor arguments, submodule names and state-dict keys, same arithmetic order.

Precision: under autocast the conv stack may run in FP16/BF16, but three parts are always computed
in FP32 with autocast disabled inside the modules: the F0 -> phase cumulative sum (``source.py``),
the STFT of the source signal (``_stft``) and the magnitude/phase -> iSTFT head (``_istft_head``).
The F0 contour is cast to FP32 before it reaches the source module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.hift.layers import (
    CausalConv1d,
    CausalConv1dDownSample,
    CausalConv1dUpsample,
    ResBlock,
    fp32_region,
    upstream_init_weights,
)
from cosytrain.models.hift.source import SourceModuleHnNSF
from cosytrain.models.hift.weight_norm import strip_generator_prefix, weight_norm

__all__ = ["HiFTGenerator", "CausalHiFTGenerator", "strip_generator_prefix"]

_DEFAULT_ISTFT = {"n_fft": 16, "hop_len": 4}


def periodic_hann(n: int) -> torch.Tensor:
    """float32 periodic Hann window, bit-identical to ``scipy.signal.get_window('hann', n, fftbins=True)``
    cast to float32 (same float64 formula: 0.5 + 0.5*cos over n+1 points from -pi to pi, last dropped);
    computed here so that importing the vocoder does not pull in scipy.signal."""
    fac = np.linspace(-np.pi, np.pi, n + 1)
    window = np.zeros(n + 1)
    window += 0.5 * np.cos(0 * fac)
    window += 0.5 * np.cos(fac)
    return torch.from_numpy(window[:n].astype(np.float32))


class HiFTGenerator(nn.Module):
    """Mel (B, 80, T) -> waveform (B, T * prod(upsample_rates) * hop_len).

    ``sampling_rate == 22050`` selects upstream's ``SineGen`` (v1); any other rate ``SineGen2`` (v2).
    """

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: List[int] = [8, 8],
        upsample_kernel_sizes: List[int] = [16, 16],
        istft_params: Dict[str, int] = _DEFAULT_ISTFT,
        resblock_kernel_sizes: List[int] = [3, 7, 11],
        resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        source_resblock_kernel_sizes: List[int] = [7, 11],
        source_resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5]],
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self._init_common(in_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma, nsf_voiced_threshold,
                          upsample_rates, upsample_kernel_sizes, istft_params, resblock_kernel_sizes,
                          source_resblock_kernel_sizes, source_resblock_dilation_sizes, lrelu_slope, audio_limit,
                          causal=False)
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, 1, padding=3))
        self.ups = nn.ModuleList([
            weight_norm(nn.ConvTranspose1d(base_channels // (2 ** i), base_channels // (2 ** (i + 1)), k, u,
                                           padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        ])
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(self._source_stages(upsample_rates, source_resblock_kernel_sizes,
                                                          source_resblock_dilation_sizes)):
            ch = base_channels // (2 ** (i + 1))
            if u == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base_channels // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = weight_norm(nn.Conv1d(ch, self.n_fft + 2, 7, 1, padding=3))
        self._finish_init(f0_predictor)

    # ------------------------------------------------------------------ construction helpers
    def _init_common(self, in_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma, nsf_voiced_threshold,
                     upsample_rates, upsample_kernel_sizes, istft_params, resblock_kernel_sizes,
                     source_resblock_kernel_sizes, source_resblock_dilation_sizes, lrelu_slope, audio_limit,
                     causal: bool) -> None:
        if "n_fft" not in istft_params or "hop_len" not in istft_params:
            raise ConfigurationError(f"HiFTGenerator: istft_params needs 'n_fft' and 'hop_len', got"
                                     f" {dict(istft_params)}")
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ConfigurationError("HiFTGenerator: upsample_rates and upsample_kernel_sizes must have the same"
                                     " length")
        if len(source_resblock_kernel_sizes) != len(upsample_rates) or len(source_resblock_dilation_sizes) != len(upsample_rates):
            raise ConfigurationError(f"HiFTGenerator: need one source resblock per upsample stage"
                                     f" ({len(upsample_rates)}), got {len(source_resblock_kernel_sizes)} kernel sizes")
        self.out_channels = 1
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = dict(istft_params)
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.upsample_rates = list(upsample_rates)
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_scale = int(np.prod(upsample_rates)) * self.hop_len
        self.m_source = SourceModuleHnNSF(
            sampling_rate=sampling_rate, upsample_scale=self.upsample_scale, harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha, add_noise_std=nsf_sigma, voiced_threshod=nsf_voiced_threshold,
            sinegen_type="1" if sampling_rate == 22050 else "2", causal=causal)
        self.f0_upsamp = nn.Upsample(scale_factor=self.upsample_scale)

    @staticmethod
    def _source_stages(upsample_rates, kernel_sizes, dilation_sizes):
        """Per upsample stage: the source STFT's downsampling factor to that stage's rate, k, dilations."""
        downsample_rates = [1] + list(upsample_rates[::-1][:-1])
        cum_rates = np.cumprod(downsample_rates)[::-1]
        return [(int(u), k, d) for u, k, d in zip(cum_rates, kernel_sizes, dilation_sizes)]

    def _finish_init(self, f0_predictor: Optional[nn.Module]) -> None:
        self.ups.apply(upstream_init_weights)
        self.conv_post.apply(upstream_init_weights)
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        # Upstream keeps the periodic Hann window as a plain attribute (never in the state dict).
        self.register_buffer("stft_window", periodic_hann(self.n_fft), persistent=False)
        self.f0_predictor = f0_predictor

    # ------------------------------------------------------------------ FP32 spectral parts
    def _window(self, x: torch.Tensor) -> torch.Tensor:
        return self.stft_window.to(device=x.device, dtype=torch.float32)

    def _stft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source (B, L) -> real, imag (B, n_fft/2+1, L/hop+1), centred, always FP32."""
        with fp32_region(x):
            spec = torch.stft(x.float(), self.n_fft, self.hop_len, self.n_fft, window=self._window(x),
                              return_complex=True)
            spec = torch.view_as_real(spec)
            return spec[..., 0], spec[..., 1]

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        with fp32_region(magnitude):
            magnitude = torch.clip(magnitude.float(), max=1e2)
            phase = phase.float()
            real = magnitude * torch.cos(phase)
            img = magnitude * torch.sin(phase)
            return torch.istft(torch.complex(real, img), self.n_fft, self.hop_len, self.n_fft,
                               window=self._window(magnitude))

    def _istft_head(self, x: torch.Tensor) -> torch.Tensor:
        """conv_post output (B, n_fft+2, T') -> waveform: exp magnitude, sin phase, iSTFT, all FP32."""
        with fp32_region(x):
            x = x.float()
            bins = self.n_fft // 2 + 1
            magnitude = torch.exp(x[:, :bins, :])
            phase = torch.sin(x[:, bins:, :])  # upstream: "actually, sin is redundancy"
            return self._istft(magnitude, phase)

    def _source_stft(self, s: torch.Tensor) -> torch.Tensor:
        real, imag = self._stft(s.squeeze(1))
        return torch.cat([real, imag], dim=1)

    # ------------------------------------------------------------------ network
    def _fuse_stages(self, x: torch.Tensor, s_stft: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = self.reflection_pad(x)
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01 here, as upstream
        return self.conv_post(x)

    def decode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Mel (B, 80, T) + source (B, 1, T * upsample_scale) -> waveform (B, T * upsample_scale)."""
        s_stft = self._source_stft(s)
        x = self._fuse_stages(self.conv_pre(x), s_stft)
        x = self._istft_head(x)
        return torch.clamp(x, -self.audio_limit, self.audio_limit)

    def f0_to_source(self, f0: torch.Tensor) -> torch.Tensor:
        """F0 per frame (B, T) -> excitation (B, 1, T * upsample_scale), FP32."""
        with fp32_region(f0):
            f0 = self.f0_upsamp(f0.float()[:, None]).transpose(1, 2)  # (B, L, 1)
        s, _, _ = self.m_source(f0)
        return s.transpose(1, 2)

    def _predict_f0(self, speech_feat: torch.Tensor) -> torch.Tensor:
        """F0 in the predictor's own dtype with autocast off: an FP16 F0 (about 0.1 Hz error at 200 Hz)
        drifts the summed harmonic phase by a sizeable fraction of a cycle within a second."""
        if self.f0_predictor is None:
            raise RuntimeError(f"{type(self).__name__}: no f0_predictor was given; pass one to the constructor")
        dtype = next(self.f0_predictor.parameters()).dtype
        with fp32_region(speech_feat):
            return self.f0_predictor(speech_feat.to(dtype))

    def forward(self, batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step input: ``batch['speech_feat']`` (B, T, 80) -> (generated speech (B, L), f0 (B, T))."""
        speech_feat = batch["speech_feat"].transpose(1, 2).to(device)
        f0 = self._predict_f0(speech_feat)
        s = self.f0_to_source(f0)
        generated_speech = self.decode(x=speech_feat, s=s)
        return generated_speech, f0

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor,
                  cache_source: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (B, 80, T) -> (speech (B, L), source (B, 1, L)).

        ``cache_source`` (B, 1, N), the tail source of the previous chunk, overwrites the first N source
        samples so that chunked synthesis has no phase jump at the boundary.
        """
        f0 = self._predict_f0(speech_feat)
        s = self.f0_to_source(f0)
        if cache_source is not None and cache_source.shape[2] != 0:
            s[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(x=speech_feat, s=s), s


class CausalHiFTGenerator(HiFTGenerator):
    """v3 streaming vocoder: one-sided convs, nearest-upsample convs and fixed (seeded-at-build) noise.

    ``conv_pre`` looks ``conv_pre_look_right`` frames ahead. With ``finalize=False`` those last frames
    are used only as context and the final ``upsample_scale`` samples are dropped (they would change
    once more mel arrives).

    Deviation from upstream: upstream's ``inference`` converts ``f0_predictor`` to float64 **in place**
    (so after one call the state dict holds float64 tensors). Here the float64 F0 is computed with
    ``torch.func.functional_call`` on float64 copies of the predictor's parameters; the module itself
    keeps its dtype. The numbers are the same.
    """

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: List[int] = [8, 8],
        upsample_kernel_sizes: List[int] = [16, 16],
        istft_params: Dict[str, int] = _DEFAULT_ISTFT,
        resblock_kernel_sizes: List[int] = [3, 7, 11],
        resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        source_resblock_kernel_sizes: List[int] = [7, 11],
        source_resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5]],
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        conv_pre_look_right: int = 4,
        f0_predictor: Optional[nn.Module] = None,
    ) -> None:
        nn.Module.__init__(self)
        self._init_common(in_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma, nsf_voiced_threshold,
                          upsample_rates, upsample_kernel_sizes, istft_params, resblock_kernel_sizes,
                          source_resblock_kernel_sizes, source_resblock_dilation_sizes, lrelu_slope, audio_limit,
                          causal=True)
        self.conv_pre = weight_norm(CausalConv1d(in_channels, base_channels, conv_pre_look_right + 1, 1,
                                                 causal_type="right"))
        self.ups = nn.ModuleList([
            weight_norm(CausalConv1dUpsample(base_channels // (2 ** i), base_channels // (2 ** (i + 1)), k, u))
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        ])
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(self._source_stages(upsample_rates, source_resblock_kernel_sizes,
                                                          source_resblock_dilation_sizes)):
            ch = base_channels // (2 ** (i + 1))
            if u == 1:
                self.source_downs.append(CausalConv1d(self.n_fft + 2, ch, 1, 1, causal_type="left"))
            else:
                self.source_downs.append(CausalConv1dDownSample(self.n_fft + 2, ch, u * 2, u))
            self.source_resblocks.append(ResBlock(ch, k, d, causal=True))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base_channels // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, causal=True))
        self.conv_post = weight_norm(CausalConv1d(ch, self.n_fft + 2, 7, 1, causal_type="left"))
        self.conv_pre_look_right = conv_pre_look_right
        self._finish_init(f0_predictor)

    def decode(self, x: torch.Tensor, s: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        s_stft = self._source_stft(s)
        if finalize:
            x = self.conv_pre(x)
        else:
            look = self.conv_pre_look_right
            x = self.conv_pre(x[:, :, :-look], x[:, :, -look:])
            s_stft = s_stft[:, :, :-int(np.prod(self.upsample_rates)) * look]
        x = self._fuse_stages(x, s_stft)
        x = self._istft_head(x)
        if not finalize:
            x = x[:, :-self.upsample_scale]
        return torch.clamp(x, -self.audio_limit, self.audio_limit)

    def predict_f0_float64(self, speech_feat: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """F0 from a float64 evaluation of the predictor (upstream: "precision is crucial for causal
        inference"), without converting the module: parameters are cast for this call only."""
        if self.f0_predictor is None:
            raise RuntimeError("CausalHiFTGenerator: no f0_predictor was given; pass CausalConvRNNF0Predictor(...)")
        with fp32_region(speech_feat):
            params = {k: v.to(torch.float64) for k, v in self.f0_predictor.named_parameters()}
            buffers = {k: v.to(torch.float64) if v.is_floating_point() else v
                       for k, v in self.f0_predictor.named_buffers()}
            return torch.func.functional_call(self.f0_predictor, {**params, **buffers},
                                              (speech_feat.to(torch.float64),), {"finalize": finalize})

    def forward(self, batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step as upstream's HiFTGenerator.forward (finalize, float32 F0 predictor)."""
        speech_feat = batch["speech_feat"].transpose(1, 2).to(device)
        f0 = self._predict_f0(speech_feat)
        s = self.f0_to_source(f0)
        return self.decode(x=speech_feat, s=s, finalize=True), f0

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, finalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (B, 80, T) -> (speech, source).

        ``finalize=False`` (streaming chunk): the last 3 mel frames are only the F0 predictor's look-ahead,
        the 4 before them only conv_pre's, and the last remaining frame's samples are held back, so
        speech has (T - 3 - 4 - 1) * upsample_scale samples and source (T - 3) * upsample_scale.
        """
        f0 = self.predict_f0_float64(speech_feat, finalize=finalize).to(speech_feat.dtype)
        s = self.f0_to_source(f0)
        if finalize:
            speech = self.decode(x=speech_feat, s=s, finalize=True)
        else:
            look = self.f0_predictor.condnet[0].causal_padding
            speech = self.decode(x=speech_feat[:, :, :-look], s=s, finalize=False)
        return speech, s
