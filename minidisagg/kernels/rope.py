"""Rotary position embeddings (half-split layout, as in HF Llama), with Llama-3 frequency scaling."""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Optional

import torch

from minidisagg.config import RopeScaling
from minidisagg.kernels.triton_support import next_pow2, triton_modules, use_triton


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2] in float32, Llama-3 scaled when asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_freq_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(
    max_position: int, head_dim: int, theta: float, scaling: Optional[RopeScaling], device: torch.device | str
) -> torch.Tensor:
    """Table [max_position, head_dim] holding cos (first half) and sin (second half), float32."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_position, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


_STEP_TABLES = threading.local()  # per thread: (positions, cos_sin, cos [T, 1, D], signed sin [T, 1, D])


def _rotation_tables(positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin rows [T, 1, D] for these positions, built once per forward pass.

    Every layer of a forward pass passes the same ``positions`` tensor, so a one-entry cache keyed
    by identity serves 29 of SmolLM2's 30 layers (holding the tensors keeps the identity unique).
    """
    last = getattr(_STEP_TABLES, "last", None)
    if last is not None and last[0] is positions and last[1] is cos_sin:
        return last[2], last[3]
    tables = rotation_tables(positions, cos_sin)
    _STEP_TABLES.last = (positions, cos_sin, *tables)
    return tables


def rotation_tables(positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin rows [T, 1, D] for these positions (no cache: traceable by torch.compile)."""
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions].unsqueeze(1)
    cos, sin = table[..., :half], table[..., half:]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by tables from ``rotation_tables``: ``x * [cos, cos] + [x2, x1] * [-sin, sin]``."""
    half = q.shape[-1] // 2
    x = torch.cat([q, k], dim=1)
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [x2, x1] in every head
    rotated = torch.mul(x, cos).add_(swapped * signed_sin).to(q.dtype)  # not addcmul: it fuses (other bits)
    return rotated[:, : q.shape[1]], rotated[:, q.shape[1]:]


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KH, D] by their positions; returns new tensors in the input dtype.

    Each head's halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin), computed in float32 as
    ``x * [cos, cos] + [x2, x1] * [-sin, sin]`` (the same roundings); q and k are rotated together
    and the halves swapped by one ``flip``, so the reference costs five ops per layer (and rounds
    like the Triton kernels: one product each, then one add, bit for bit).
    """
    return rotate(q, k, *_rotation_tables(positions, cos_sin))


@functools.cache
def rope_kernel() -> Any:
    """The one Triton RoPE kernel, built on first use (so triton is imported only when it runs).

    ``WRITE_KV`` (a compile-time flag) also stores the rotated k and the unrotated v in their cache
    slots: ``kernels/rope_cache.py`` launches it that way, :func:`apply_rope_triton` without.
    """
    triton, tl = triton_modules()

    @triton.jit
    def _rope(
        q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
        table_stride, block_size, cache_block_stride, cache_slot_stride, cache_head_stride,
        num_heads, num_kv_heads, half,
        BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, WRITE_KV: tl.constexpr,
    ):
        # One program per token rotates its q and k heads in place (float32 math, stored in the input
        # dtype); with WRITE_KV it then copies the rotated k and the unrotated v into slot_mapping[token].
        token = tl.program_id(0).to(tl.int64)
        row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * table_stride
        d = tl.arange(0, BLOCK_HALF)[None, :]
        cos = tl.load(row + d, mask=d < half, other=0.0).to(tl.float32)
        sin = tl.load(row + half + d, mask=d < half, other=0.0).to(tl.float32)

        # q: x1 is the first half of a head, x2 the second: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < num_heads) & (d < half)
        ptrs = q_ptr + token * q_token_stride + h * q_head_stride + d
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + half, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)

        # k: the same rotation over the KV heads, rounded to k's dtype before it goes anywhere, so the
        # cache holds exactly what the returned k holds (cast again on store if the cache dtype differs).
        h = tl.arange(0, BLOCK_KH)[:, None]
        mask = (h < num_kv_heads) & (d < half)
        ptrs = k_ptr + token * k_token_stride + h * k_head_stride + d
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
        k1 = (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty)
        k2 = (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty)
        tl.store(ptrs, k1, mask=mask)
        tl.store(ptrs + half, k2, mask=mask)

        if WRITE_KV:
            slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
            if slot >= 0:  # a negative slot (padding) writes nothing
                dst = (slot // block_size) * cache_block_stride + (slot % block_size) * cache_slot_stride
                dst += h * cache_head_stride + d
                tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
                tl.store(k_cache_ptr + dst + half, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
                src = v_ptr + token * v_token_stride + h * v_head_stride + d
                v1 = tl.load(src, mask=mask)
                v2 = tl.load(src + half, mask=mask)
                tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
                tl.store(v_cache_ptr + dst + half, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)

    return _rope


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RoPE: rotates q [T, H, D] and k [T, KH, D] in place (views of a fused QKV are fine)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    table = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    tokens, num_heads, head_dim = q.shape
    if tokens > 0:
        unused = q  # WRITE_KV=False: the v, cache and slot pointers are never read
        rope_kernel()[(tokens,)](
            q, k, unused, positions.contiguous(), table, unused, unused, positions,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0,
            table.stride(0), 1, 0, 0, 0,
            num_heads, k.shape[1], head_dim // 2,
            BLOCK_H=next_pow2(num_heads), BLOCK_KH=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(head_dim // 2),
            WRITE_KV=False,
        )
    return q, k


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch point for RoPE on packed tokens; use the returned tensors (Triton rotates in place)."""
    if use_triton(q):
        return apply_rope_triton(q, k, positions, cos_sin)
    return apply_rope_reference(q, k, positions, cos_sin)
