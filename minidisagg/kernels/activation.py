"""SwiGLU: ``silu(gate) * up`` on the fused gate/up projection output."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from minidisagg.kernels.cpu_native import use_cpu_native
from minidisagg.kernels.triton_support import triton_modules, use_triton

BLOCK_FFN = 1024  # FFN columns per program; the last block of a row is masked


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` is [tokens, 2 * ffn]; returns silu(first half) * second half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


@functools.cache
def silu_and_mul_kernel() -> Any:
    """The Triton kernel, built on first use (so triton is imported only when it runs)."""
    triton, tl = triton_modules()

    @triton.jit
    def _silu_and_mul(gate_up_ptr, out_ptr, ffn, in_row_stride, out_row_stride, BLOCK: tl.constexpr):
        # Program (row, column block): out = silu(gate) * up; silu in float32, rounded like F.silu's.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ffn
        gate = tl.load(gate_up_ptr + row * in_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * in_row_stride + ffn + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_row_stride + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)

    return _silu_and_mul


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`silu_and_mul_reference` for [tokens, 2 * ffn] input."""
    ffn = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * ffn)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], ffn, dtype=x.dtype, device=x.device)
    if x.shape[0] > 0:
        silu_and_mul_kernel()[(x.shape[0], -(-ffn // BLOCK_FFN))](
            x, out, ffn, x.stride(0), out.stride(0), BLOCK=BLOCK_FFN
        )
    return out.view(*gate_up.shape[:-1], ffn)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Dispatch point for SwiGLU."""
    if use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    if use_cpu_native(gate_up):  # the reference's ATen calls in one C++ op (kernels/cpu_native.py)
        return torch.ops.minidisagg_cpu.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)
