"""The preallocated pool of KV pages that every layer's attention reads and writes."""

from __future__ import annotations

from typing import Optional

import torch

from minidisagg.config import ModelConfig

KV_POOL_LAYOUTS = ("layer_major", "block_major")


def default_pool_layout(device: torch.device | str) -> str:
    """The pool layout used when none is asked for: ``block_major`` on CUDA, ``layer_major`` elsewhere.

    On a GPU the kernels read either layout at the same speed (llama-8b decode at batch 32 with
    2k-token contexts: equal TPOT on an H200), and ``block_major`` lets a run of blocks cross
    the wire with no copy on either side. On a CPU a layer's pages are one range in ``layer_major``,
    which ``compile_cpu`` and the opt-in C++ decode step need.
    """
    return "block_major" if torch.device(device).type == "cuda" else "layer_major"


class PagedKVCache:
    """All KV pages, seen as ``kv`` [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].

    Layer ``l``'s keys are ``kv[l, 0]`` and values ``kv[l, 1]``; a token's slot is
    ``block_id * block_size + offset``. ``kv`` is how every reader indexes the pool; how it sits in
    memory is the ``layout``:

    - ``layer_major`` (the default on a CPU): ``kv`` itself is contiguous: each layer's pages are one
      range, so a layer can be shipped as it is computed, and a lone sequence's keys are a
      slice of it (the torch reference of decode attention reads them without a copy);
    - ``block_major``: the memory is ``by_block`` [num_blocks, num_layers, 2, block_size,
      num_kv_heads, head_dim]: a block holds every layer's K and V, so the pages of a run of
      consecutive blocks are one contiguous range, which a transport sends or receives
      without a copy (the default on CUDA, see ``default_pool_layout``). The GPU kernels read
      pages through strides, so they take either layout.

    ``by_block`` is the same pool indexed block first, in either layout.
    """

    def __init__(
        self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
        layout: Optional[str] = None,
    ) -> None:
        layout = layout or default_pool_layout(device)
        if layout not in KV_POOL_LAYOUTS:
            raise ValueError(f"KV pool layout must be one of {KV_POOL_LAYOUTS}, got {layout!r}")
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.layout = layout
        inner = (block_size, model.num_kv_heads, model.head_dim)
        if layout == "layer_major":
            self.kv = torch.zeros(model.num_layers, 2, num_blocks, *inner, dtype=dtype, device=device)
        else:
            by_block = torch.zeros(num_blocks, model.num_layers, 2, *inner, dtype=dtype, device=device)
            self.kv = by_block.permute(1, 2, 0, 3, 4, 5)

    @property
    def by_block(self) -> torch.Tensor:
        """The pool indexed block first: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (a view)."""
        return self.kv.permute(2, 0, 1, 3, 4, 5)

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
