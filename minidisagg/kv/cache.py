"""The preallocated pool of KV pages that every layer's attention reads and writes."""

from __future__ import annotations

import torch

from minidisagg.config import ModelConfig


class PagedKVCache:
    """One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] holding all KV pages.

    Layer ``l``'s keys are ``kv[l, 0]`` and values ``kv[l, 1]``; a token's slot is
    ``block_id * block_size + offset``. Keeping each layer contiguous lets a transport ship
    the KV cache layer by layer.
    """

    def __init__(
        self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.zeros(
            model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim, dtype=dtype, device=device
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.kv[index, 0], self.kv[index, 1]

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, K and V."""
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole pool."""
        return self.kv.numel() * self.kv.element_size()
