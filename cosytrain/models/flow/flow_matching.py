"""Conditional flow matching (upstream ``cosyvoice.flow.flow_matching.ConditionalCFM``).

Training: optimal-transport conditional flow matching with classifier-free-guidance dropout of the
conditions. Inference: a fixed-step Euler ODE solve on a cosine time grid with CFG.

RNG draw order is part of the contract (upstream checkpoints and fixtures replay it):
``compute_loss`` draws ``t = rand(B,1,1)``, then ``z = randn_like(x1)``, then ``rand(B)`` for the
CFG mask; ``forward`` draws the initial noise ``z`` with the shape of ``mu`` first.

Precision: the Euler state ``x``, the time ``t`` and the step ``dt`` are FP32 whatever autocast
does; only the estimator runs in reduced precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError


def cfm_param(cfm_params: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a dict/Mapping or an attribute-style object (omegaconf ``DictConfig``)."""
    if isinstance(cfm_params, Mapping):
        value = cfm_params.get(name, default)
    else:
        value = getattr(cfm_params, name, default)
    if value is None and default is None:
        raise ConfigurationError(f"cfm_params has no {name!r}; add it to decoder.cfm_params in the config")
    return value


class ConditionalCFM(nn.Module):
    """Flow-matching wrapper around an estimator network (the U-Net or a DiT)."""

    def __init__(self, in_channels: int, cfm_params: Any, n_spks: int = 1, spk_emb_dim: int = 64,
                 estimator: Optional[nn.Module] = None):
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = cfm_param(cfm_params, "solver", "euler")
        if self.solver != "euler":
            raise ConfigurationError(f"cfm_params.solver={self.solver!r} is not supported; upstream only implements"
                                     f" 'euler'")
        self.sigma_min = float(cfm_param(cfm_params, "sigma_min", 1e-4))
        self.t_scheduler = cfm_param(cfm_params, "t_scheduler", "linear")
        self.training_cfg_rate = float(cfm_param(cfm_params, "training_cfg_rate", 0.0))
        self.inference_cfg_rate = float(cfm_param(cfm_params, "inference_cfg_rate", 0.0))
        self.estimator = estimator

    # -- inference -----------------------------------------------------------------------------
    def t_span(self, n_timesteps: int, device: torch.device) -> torch.Tensor:
        """FP32 time grid from 0 to 1; 'cosine' squeezes steps towards t=0."""
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
        if self.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    def initial_noise(self, mu: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z ~ N(0, I) in FP32 (the same draw as upstream's ``randn_like(mu)`` for an FP32 ``mu``)."""
        return torch.randn(mu.shape, device=mu.device, dtype=torch.float32) * temperature

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int, temperature: float = 1.0,
                spks: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None, prompt_len: int = 0,
                cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample a mel (B, 80, T) from the encoder output ``mu``.

        ``cache`` (B, 80, N, 2) holds (z, mu) frames from a previous call that are reused at the start
        (prompt + overlap, for v1 streaming); the returned cache keeps the first ``prompt_len`` and the
        last 34 frames of z and mu, as upstream.
        """
        z = self.initial_noise(mu, temperature)
        mu = mu.clone()
        if cache is not None and cache.shape[2] != 0:
            n = cache.shape[2]
            z[:, :, :n] = cache[:, :, :, 0].to(z.dtype)
            mu[:, :, :n] = cache[:, :, :, 1].to(mu.dtype)
        z_cache = torch.cat([z[:, :, :prompt_len], z[:, :, -34:]], dim=2)
        mu_cache = torch.cat([mu[:, :, :prompt_len], mu[:, :, -34:]], dim=2)
        new_cache = torch.stack([z_cache, mu_cache.to(z_cache.dtype)], dim=-1)
        feat = self.solve_euler(z, t_span=self.t_span(n_timesteps, mu.device), mu=mu, mask=mask, spks=spks, cond=cond)
        return feat, new_cache

    def estimator_dtype(self) -> torch.dtype:
        param = next(self.estimator.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def forward_estimator(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                          spks: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                          streaming: bool = False) -> torch.Tensor:
        """One estimator call; the hook where an exported (ONNX/TensorRT) estimator would plug in."""
        return self.estimator(x, mask, mu, t, spks, cond, streaming=streaming)

    def solve_euler(self, x: torch.Tensor, t_span: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                    spks: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                    streaming: bool = False) -> torch.Tensor:
        """Fixed-step Euler with CFG: ``v = (1+w) v(cond) - w v(uncond)``, ``x += dt * v``.

        With ``inference_cfg_rate > 0`` the conditional and unconditional passes run as one batch
        of 2B (upstream always batches 2 and hard-codes 80 mel bins; this follows the input shapes).
        """
        x = x.float()
        t_span = t_span.float()
        t = t_span[0].unsqueeze(0)
        dt = t_span[1] - t_span[0]
        in_dtype = self.estimator_dtype()
        b = x.size(0)
        use_cfg = self.inference_cfg_rate > 0
        if use_cfg:
            x_in = torch.zeros((2 * b,) + tuple(x.shape[1:]), device=x.device, dtype=in_dtype)
            mask_in = torch.zeros((2 * b,) + tuple(mask.shape[1:]), device=x.device, dtype=in_dtype)
            mu_in = torch.zeros((2 * b,) + tuple(mu.shape[1:]), device=x.device, dtype=in_dtype)
            t_in = torch.zeros(2 * b, device=x.device, dtype=in_dtype)
            spks_in = None if spks is None else torch.zeros((2 * b,) + tuple(spks.shape[1:]), device=x.device,
                                                            dtype=in_dtype)
            cond_in = None if cond is None else torch.zeros((2 * b,) + tuple(cond.shape[1:]), device=x.device,
                                                            dtype=in_dtype)
        for step in range(1, len(t_span)):
            if use_cfg:
                x_in[:b] = x
                x_in[b:] = x
                mask_in[:b] = mask
                mask_in[b:] = mask
                mu_in[:b] = mu
                t_in[:] = t
                if spks_in is not None:
                    spks_in[:b] = spks
                if cond_in is not None:
                    cond_in[:b] = cond
                v = self.forward_estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming).float()
                v_cond, v_uncond = torch.split(v, [b, b], dim=0)
                v = (1.0 + self.inference_cfg_rate) * v_cond - self.inference_cfg_rate * v_uncond
            else:
                t_b = t.expand(b).to(in_dtype)
                v = self.forward_estimator(x.to(in_dtype), mask.to(in_dtype), mu.to(in_dtype), t_b,
                                           None if spks is None else spks.to(in_dtype),
                                           None if cond is None else cond.to(in_dtype), streaming).float()
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x

    # -- training ------------------------------------------------------------------------------
    def compute_loss(self, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,
                     spks: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                     streaming: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Masked MSE between the predicted and the target velocity ``u = x1 - (1 - sigma_min) z``.

        ``t`` is uniform (no cosine warp here, as in current upstream). The loss is reduced in FP32.
        """
        b = mu.shape[0]
        x1 = x1.float()
        t = torch.rand([b, 1, 1], device=mu.device, dtype=torch.float32)
        z = torch.randn_like(x1)
        y = (1 - (1 - self.sigma_min) * t) * z + t * x1
        u = x1 - (1 - self.sigma_min) * z
        if self.training_cfg_rate > 0:
            cfg_mask = torch.rand(b, device=x1.device) > self.training_cfg_rate
            mu = mu * cfg_mask.view(-1, 1, 1)
            if spks is not None:
                spks = spks * cfg_mask.view(-1, 1)
            if cond is not None:
                cond = cond * cfg_mask.view(-1, 1, 1)
        pred = self.estimator(y, mask, mu, t.squeeze(), spks, cond, streaming=streaming)
        mask32 = mask.float()
        loss = F.mse_loss(pred.float() * mask32, u * mask32, reduction="sum") / (torch.sum(mask32) * u.shape[1])
        return loss, y


# Upstream: ``set_all_random_seed(0); rand_noise = torch.randn([1, 80, 50 * 300])`` (300 s at 50 Hz).
FIXED_NOISE_SEED = 0
FIXED_NOISE_FRAMES = 50 * 300


def fixed_noise(n_mels: int = 80, frames: int = FIXED_NOISE_FRAMES, seed: int = FIXED_NOISE_SEED) -> torch.Tensor:
    """The (1, n_mels, frames) Gaussian noise upstream draws right after seeding torch with 0.

    A private CPU generator seeded 0 yields the same numbers as ``torch.manual_seed(0); torch.randn``
    without reseeding the global RNGs mid-construction as upstream does (its side effect on python
    ``random``/numpy/torch is deliberately not reproduced). Built on the CPU even under a ``meta``
    default device, so meta-device builds still carry the real noise.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((1, n_mels, frames), generator=generator, device="cpu", dtype=torch.float32)


class CausalConditionalCFM(ConditionalCFM):
    """CosyVoice 2/3 flow matching: the inference noise is a fixed slice, not a fresh draw.

    Frame i always gets the same noise, so re-synthesising a growing prefix chunk by chunk
    (streaming) reproduces the frames already emitted. ``rand_noise`` is a plain attribute, as
    upstream, so it is not in the state dict; only the slice used is moved to the input's device.
    """

    def __init__(self, in_channels: int, cfm_params: Any, n_spks: int = 1, spk_emb_dim: int = 64,
                 estimator: Optional[nn.Module] = None):
        super().__init__(in_channels, cfm_params, n_spks=n_spks, spk_emb_dim=spk_emb_dim, estimator=estimator)
        self.rand_noise = fixed_noise()

    def initial_noise(self, mu: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        frames = mu.shape[2]
        if frames > self.rand_noise.shape[2]:
            raise ValueError(f"flow input has {frames} mel frames; the fixed noise covers "
                             f"{self.rand_noise.shape[2]} (300 s), so synthesise shorter segments")
        noise = self.rand_noise[:, :, :frames].to(device=mu.device, dtype=torch.float32)
        return noise.expand(mu.shape[0], -1, -1) * temperature

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int,  # type: ignore[override]
                temperature: float = 1.0, spks: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, streaming: bool = False) -> Tuple[torch.Tensor, None]:
        """Mel (B, 80, T) from ``mu``; the second value is always None (upstream returns no cache)."""
        z = self.initial_noise(mu, temperature)
        feat = self.solve_euler(z, t_span=self.t_span(n_timesteps, mu.device), mu=mu, mask=mask, spks=spks,
                                cond=cond, streaming=streaming)
        return feat, None


__all__ = ["CausalConditionalCFM", "ConditionalCFM", "cfm_param", "fixed_noise"]
