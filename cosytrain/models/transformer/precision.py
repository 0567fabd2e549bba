"""Precision rules for mixed-precision (FP16/BF16 autocast) runs, applied inside the modules.

CUDA autocast already runs LayerNorm in float32; CPU autocast does not (it keeps the input
dtype), which would leave the residual stream in half precision on CPU. ``LayerNorm`` here
normalises in float32 under autocast on every device, so the residual stream stays float32
and CPU and GPU mixed-precision runs behave alike. Outside autocast it is exactly
``torch.nn.LayerNorm`` (same numbers, same state-dict keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def autocast_active(x: torch.Tensor) -> bool:
    """True when autocast is on for ``x``'s device type."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 has no device_type argument
        if x.device.type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def match_dtype(fp32_value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep a float32 constant in float32 under autocast; follow ``x`` in a pure-half model."""
    if autocast_active(x) or fp32_value.dtype == x.dtype:
        return fp32_value
    return fp32_value.to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` that computes (and returns) float32 under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not autocast_active(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
