"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

from typing import Optional

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rmsnorm(x + residual) * weight, x + residual)``, computed in float32 like HF Llama."""
    if residual is not None:
        x = x + residual
    new_residual = x
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    normed = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, new_residual


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch point: fused residual add + RMSNorm. Returns ``(normed, new_residual)``."""
    return rms_norm_reference(x, weight, eps, residual)
