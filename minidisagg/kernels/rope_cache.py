"""RoPE and the paged KV-cache write fused: rotate q and k, then store the rotated k and v in their slots.

Every layer rotates the new tokens' q and k and then copies k and v into the paged cache. As two
kernels these are two launches per layer, each moving a few kilobytes in a decode step: on a GPU
both are bound by launch latency, even inside a CUDA graph (``benchmarks/NOTES.md``, "Figures
behind the code"), not by memory.
One kernel that rotates k in registers and stores it straight into the cache halves the launches
per layer and reads k once instead of twice. The torch path runs the two references in turn, so
the fused kernel has exactly the unfused semantics to be tested against.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from minidisagg.kernels.cache_write import write_kv_reference
from minidisagg.kernels.cpu_native import in_cpu_graph, use_cpu_native
from minidisagg.kernels.rope import apply_rope_reference, rotate, rotation_tables
from minidisagg.kernels.triton_support import next_pow2, triton_modules, use_triton


def rope_and_write_kv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: :func:`apply_rope_reference`, then :func:`write_kv_reference` of the rotated k and v."""
    q, k = apply_rope_reference(q, k, positions, cos_sin)
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q, k


@functools.cache
def rope_cache_kernel() -> Any:
    """The Triton kernel, built on first use (so triton is imported only when it runs)."""
    triton, tl = triton_modules()

    @triton.jit
    def _rope_and_write_kv(
        q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
        table_stride, block_size, cache_block_stride, cache_slot_stride, cache_head_stride,
        num_heads, num_kv_heads, half,
        BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        # One program per token: rotate its q and k heads in place (float32 math, stored in the input
        # dtype), then copy the rotated k and the unrotated v into slot ``slot_mapping[token]``.
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

    return _rope_and_write_kv


def rope_and_write_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version in one launch: rotates q, k in place (views of a fused QKV are fine) and fills the caches."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    table = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k and v caches must share one layout"
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if tokens > 0:
        rope_cache_kernel()[(tokens,)](
            q, k, v, positions.contiguous(), table, k_cache, v_cache, slot_mapping.contiguous(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            table.stride(0), k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_heads, num_kv_heads, head_dim // 2,
            BLOCK_H=next_pow2(num_heads), BLOCK_KH=next_pow2(num_kv_heads), BLOCK_HALF=next_pow2(head_dim // 2),
        )
    return q, k


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch point for RoPE plus the paged KV write; use the returned q, k (Triton rotates in place)."""
    if use_triton(q):
        return rope_and_write_kv_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    if use_cpu_native(q):  # the reference's ATen calls in one C++ op (kernels/cpu_native.py)
        rotated = torch.ops.minidisagg_cpu.rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        return rotated[:, : q.shape[1]], rotated[:, q.shape[1]:]
    if in_cpu_graph(q):  # traced by torch.compile: RoPE is fused into the graph, the write stays one op on the pool
        q, k = rotate(q, k, *rotation_tables(positions, cos_sin))
        torch.ops.minidisagg_cpu.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k
    return rope_and_write_kv_reference(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
