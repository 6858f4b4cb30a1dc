"""Write new tokens' K and V into their slots of the paged cache."""

from __future__ import annotations

import functools
from typing import Any

import torch

from minidisagg.kernels.triton_support import next_pow2, triton_modules, use_triton


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, KH, D] into caches [num_blocks, block_size, KH, D] at flat ``slot_mapping`` [T]."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    for new, cache in ((k, k_cache), (v, v_cache)):
        try:  # the pool's blocks follow each other (layer_major): one flat copy by slot
            flat = cache.view(-1, num_kv_heads, head_dim)
        except RuntimeError:  # blocks apart in memory (block_major): index block and offset
            block_size = cache.shape[1]
            cache.index_put_((slot_mapping // block_size, slot_mapping % block_size), new.to(cache.dtype))
        else:
            flat.index_copy_(0, slot_mapping, new.to(cache.dtype))


@functools.cache
def write_kv_kernel() -> Any:
    """The Triton kernel, built on first use (so triton is imported only when it runs)."""
    triton, tl = triton_modules()

    @triton.jit
    def _write_kv(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        k_token_stride, k_head_stride, v_token_stride, v_head_stride,
        block_size, cache_block_stride, cache_slot_stride, cache_head_stride,
        num_kv_heads, head_dim,
        BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per token copies its [KH, D] key and value into slot ``slot_mapping[token]``.
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # a negative slot (padding) writes nothing
            h = tl.arange(0, BLOCK_KH)[:, None]
            d = tl.arange(0, BLOCK_D)[None, :]
            mask = (h < num_kv_heads) & (d < head_dim)
            dst = (slot // block_size) * cache_block_stride + (slot % block_size) * cache_slot_stride
            dst += h * cache_head_stride + d
            k = tl.load(k_ptr + token * k_token_stride + h * k_head_stride + d, mask=mask)
            tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v = tl.load(v_ptr + token * v_token_stride + h * v_head_stride + d, mask=mask)
            tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    return _write_kv


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton version of :func:`write_kv_reference` (k, v may be strided views of a fused QKV)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k and v caches must share one layout"
    tokens, num_kv_heads, head_dim = k.shape
    if tokens > 0:
        write_kv_kernel()[(tokens,)](
            k, v, k_cache, v_cache, slot_mapping.contiguous(),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_kv_heads, head_dim,
            BLOCK_KH=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim),
        )


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Dispatch point for the paged KV write (slot = block_id * block_size + offset)."""
    if use_triton(k):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
