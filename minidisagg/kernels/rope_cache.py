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


import torch

from minidisagg.kernels.cache_write import write_kv_reference
from minidisagg.kernels.cpu_native import in_cpu_graph, use_cpu_native
from minidisagg.kernels.rope import apply_rope_reference, rope_kernel, rotate, rotation_tables
from minidisagg.kernels.triton_support import next_pow2, use_triton


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
        rope_kernel()[(tokens,)](
            q, k, v, positions.contiguous(), table, k_cache, v_cache, slot_mapping.contiguous(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            table.stride(0), k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_heads, num_kv_heads, head_dim // 2,
            BLOCK_H=next_pow2(num_heads), BLOCK_KH=next_pow2(num_kv_heads), BLOCK_HALF=next_pow2(head_dim // 2),
            WRITE_KV=True,
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
