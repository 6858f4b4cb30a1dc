"""Write new tokens' K and V into their slots of the paged cache."""

from __future__ import annotations

import torch


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, KH, D] into caches [num_blocks, block_size, KH, D] at flat ``slot_mapping`` [T]."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Dispatch point for the paged KV write (slot = block_id * block_size + offset)."""
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
