"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from minidisagg.kernels.cpu_native import use_cpu_native
from minidisagg.kernels.triton_support import next_pow2, triton_modules, use_triton


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rmsnorm(x + residual) * weight, x + residual)``, computed in float32 like HF Llama.

    HF's formula (``x.float() * rsqrt(mean(x**2) + eps)``, rounded to x's dtype, then times the
    weight) in as few torch ops as it takes, because on the CPU a decode step's norms are bound by
    per-op cost, not arithmetic: one float32 reduction straight from x (no float copy),
    ``eps + ||x||**2 / hidden`` in one ``addcmul``, and the float32 product rounded once on store.
    Five ops where ``F.rms_norm`` runs about a dozen (it is a composite on the CPU).
    """
    if residual is not None:
        x = x + residual
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    # a cached scalar tensor in eager mode; under torch.compile a constant (dynamo would skip the cache)
    eps_t = (torch.full((), eps, dtype=torch.float32, device=x.device) if torch.compiler.is_compiling()
             else _scalar(eps, x.device))
    inv_rms = torch.addcmul(eps_t, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
    normed = torch.mul(x, inv_rms, out=torch.empty_like(x))  # float32 math, rounded to x's dtype
    if normed.dtype == torch.promote_types(normed.dtype, weight.dtype):
        return normed.mul_(weight), x
    return weight * normed, x


@functools.cache
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached float32 0-dim tensor holding ``value`` (an op input that costs no op per call)."""
    return torch.tensor(value, dtype=torch.float32, device=device)


@functools.cache
def rms_norm_kernel() -> Any:
    """The Triton kernel, built on first use (so triton is imported only when it runs)."""
    triton, tl = triton_modules()

    @triton.jit
    def _rms_norm(
        x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
        hidden, x_row_stride, residual_row_stride, out_row_stride, new_residual_row_stride, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per row: optional residual add, then RMSNorm times weight, in float32.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            # The new residual is rounded to the input dtype, exactly as ``x + residual`` is in torch.
            x_rounded = x.to(new_residual_ptr.dtype.element_ty)
            tl.store(new_residual_ptr + row * new_residual_row_stride + cols, x_rounded, mask=mask)
            x = x_rounded.to(tl.float32)
        variance = tl.sum(x * x, axis=0) / hidden
        normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)  # rounded before the weight, as in HF
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = normed.to(tl.float32) * weight
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    return _rms_norm


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`rms_norm_reference`: one pass over x (+ residual) per row."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    res2 = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_res = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, res2.dtype), device=x.device)
    if x2.shape[0] > 0:
        block = next_pow2(hidden)
        rms_norm_kernel()[(x2.shape[0],)](
            x2, res2, weight.contiguous(), out, new_res,
            hidden, x2.stride(0), res2.stride(0), out.stride(0), new_res.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
        )
    new_residual = new_res.view(x.shape) if residual is not None else x  # without a residual, x itself
    return out.view(x.shape), new_residual


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch point: fused residual add + RMSNorm. Returns ``(normed, new_residual)``."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    if use_cpu_native(x):  # the reference's ATen calls in one C++ op (kernels/cpu_native.py)
        if residual is None:
            return torch.ops.minidisagg_cpu.rms_norm(x, weight, eps), x
        return torch.ops.minidisagg_cpu.add_rms_norm(x, residual, weight, eps)
    return rms_norm_reference(x, weight, eps, residual)
