"""A request's KV pages: gather them out of the pool, scatter them into another, describe the layout.

This is what crosses the wire in disaggregated serving: for each layer, the K and V of the
request's blocks, shape [2, num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from minidisagg.kv.cache import PagedKVCache

KV_LAYOUT_NAME = "layers,2,blocks,block_size,kv_heads,head_dim"


@dataclass(frozen=True)
class KVLayout:
    """Everything a receiver must agree on to interpret a sender's pages."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, cache: PagedKVCache) -> "KVLayout":
        """The layout of a page pool."""
        m = cache.model
        return cls(m.num_layers, m.num_kv_heads, m.head_dim, cache.block_size, cache.dtype)

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's pages for ``num_blocks`` blocks."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_nbytes(self, num_blocks: int) -> int:
        """Bytes of one layer's pages for ``num_blocks`` blocks."""
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def request_nbytes(self, num_blocks: int) -> int:
        """Bytes of a request's pages across all layers."""
        return self.num_layers * self.layer_nbytes(num_blocks)

    @property
    def dtype_name(self) -> str:
        """The dtype as a plain string, e.g. ``bfloat16``."""
        return str(self.dtype).removeprefix("torch.")


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split a block table into runs of consecutive ids: (position in table, first block id, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def _as_words(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` (trailing dims block_size, kv_heads, head_dim, contiguous) seen as 8-byte words per block.

    torch's copy between strided views moves element by element; moving 8-byte words instead of
    2-byte bf16 values took a 268 MB run copy from 0.52 to 0.92 of copy bandwidth (H100). The
    same tensor comes back when the bytes do not split into aligned words.
    """
    try:  # view, never reshape: a copy would take the writes of ``copy_blocks`` away from the pool
        return blocks.view(*blocks.shape[:-3], -1).view(torch.int64)
    except RuntimeError:  # inner dims not contiguous, or a block's bytes or offset not a multiple of 8
        return blocks


def copy_blocks(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for runs of whole blocks of the same dtype, as 8-byte words where they allow it."""
    if dst.dtype != src.dtype:
        dst.copy_(src)
        return
    dst_words, src_words = _as_words(dst), _as_words(src)
    if dst_words.dtype == src_words.dtype:
        dst_words.copy_(src_words)
    else:
        dst.copy_(src)


def scatter_layer(cache: PagedKVCache, layer: int, block_ids: Sequence[int], pages: torch.Tensor) -> None:
    """Write one layer's pages into the given blocks of ``cache`` (a plain copy per run of consecutive blocks)."""
    expected = (2, len(block_ids), *cache.kv.shape[3:])
    if tuple(pages.shape) != expected:
        raise ValueError(f"layer {layer} pages have shape {tuple(pages.shape)}, expected {expected}")
    pages = pages.to(device=cache.device, dtype=cache.dtype)
    target = cache.kv[layer]
    for pos, first, length in block_runs(block_ids):
        copy_blocks(target[:, first : first + length], pages[:, pos : pos + length])


MAX_GATHER_RUNS = 8  # up to this many runs of consecutive blocks, a gather is one copy per run


def _gather(source: torch.Tensor, block_dim: int, block_ids: Sequence[int]) -> torch.Tensor:
    """A contiguous copy of ``source``'s blocks ``block_ids`` along ``block_dim``.

    A few runs of consecutive blocks (what the FIFO block manager hands out) are copied run by
    run, each a strided copy of whole blocks at memory speed; scattered blocks go through
    ``index_select``, one launch, which ran at ~0.4 of copy bandwidth on these shapes (H100).
    """
    runs = block_runs(block_ids)
    if len(runs) > MAX_GATHER_RUNS:
        return source.index_select(block_dim, torch.as_tensor(list(block_ids), dtype=torch.long, device=source.device))
    shape = list(source.shape)
    shape[block_dim] = len(block_ids)
    out = torch.empty(shape, dtype=source.dtype, device=source.device)
    for pos, first, length in runs:
        copy_blocks(out.narrow(block_dim, pos, length), source.narrow(block_dim, first, length))
    return out


def gather_layer(cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
    """A contiguous copy of one layer's pages for the given blocks: [2, n, block_size, kv_heads, head_dim]."""
    return _gather(cache.kv[layer], 1, block_ids)


def gather_pages(cache: PagedKVCache, block_ids: Sequence[int]) -> torch.Tensor:
    """All layers' pages for the given blocks: [layers, 2, n, block_size, kv_heads, head_dim]."""
    return _gather(cache.kv, 2, block_ids)


def gather_pieces(cache: PagedKVCache, block_ids: Sequence[int],
                  pieces: Sequence[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor]]:
    """Gather consecutive layer ranges of the given blocks one at a time: yields (first layer, pages).

    Each piece is [end - first, 2, n, block_size, kv_heads, head_dim], a view of one stacked
    buffer; its copies are queued only when it is asked for, so a caller that queues a send
    between pieces overlaps the copy of one with the send of the one before. The runs of
    consecutive blocks are found once for all pieces.
    """
    runs = block_runs(block_ids)
    shape = list(cache.kv.shape)
    shape[2] = len(block_ids)
    out = torch.empty(shape, dtype=cache.kv.dtype, device=cache.kv.device)
    index = None
    for first, end in pieces:
        target, source = out[first:end], cache.kv[first:end]
        if len(runs) > MAX_GATHER_RUNS:
            if index is None:
                index = torch.as_tensor(list(block_ids), dtype=torch.long, device=source.device)
            torch.index_select(source, 2, index, out=target)
        else:
            for pos, block, length in runs:
                copy_blocks(target[:, :, pos : pos + length], source[:, :, block : block + length])
        yield first, target


def layer_pieces(num_layers: int, num_pieces: int) -> list[tuple[int, int]]:
    """Split ``num_layers`` stacked layers into ``num_pieces`` near-equal ranges (first, end), in order.

    A stacked message cut this way lets the pieces' copies and sends overlap on the GPU; both
    ends of a link compute the same split from the two numbers in the header.
    """
    if not 1 <= num_pieces <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_pieces} pieces")
    bounds = [num_layers * i // num_pieces for i in range(num_pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def scatter_pages(cache: PagedKVCache, block_ids: Sequence[int], pages: torch.Tensor, first_layer: int = 0) -> None:
    """Write consecutive layers' pages [n, 2, blocks, ...] into the given blocks of ``cache``, from ``first_layer``.

    One copy per run of consecutive blocks covers every layer at once.
    """
    num_layers = pages.shape[0] if pages.dim() == cache.kv.dim() else -1
    expected = (num_layers, 2, len(block_ids), *cache.kv.shape[3:])
    if tuple(pages.shape) != expected or not 0 <= first_layer <= cache.kv.shape[0] - num_layers:
        raise ValueError(f"pages of shape {tuple(pages.shape)} from layer {first_layer}; expected "
                         f"[n, 2, {len(block_ids)}, {', '.join(map(str, cache.kv.shape[3:]))}] with "
                         f"{first_layer} + n <= {cache.kv.shape[0]}")
    pages = pages.to(device=cache.device, dtype=cache.dtype)
    target = cache.kv[first_layer : first_layer + num_layers]
    for pos, first, length in block_runs(block_ids):
        copy_blocks(target[:, :, first : first + length], pages[:, :, pos : pos + length])
