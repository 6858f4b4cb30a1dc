"""SwiGLU: ``silu(gate) * up`` on the fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` is [tokens, 2 * ffn]; returns silu(first half) * second half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Dispatch point for SwiGLU."""
    return silu_and_mul_reference(gate_up)
