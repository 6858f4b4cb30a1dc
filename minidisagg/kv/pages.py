"""A request's KV pages: gather them out of the pool, scatter them into another, describe the layout.

This is what crosses the wire in disaggregated serving, in one of two orders: layer first (for
each layer, the K and V of the request's blocks, [2, num_blocks, block_size, num_kv_heads,
head_dim]: what a layer-by-layer transfer sends as each layer is computed), or block first (for
each block, every layer's K and V, [num_blocks, num_layers, 2, ...]: a finished prefill's pages,
which a ``block_major`` pool holds as one range, so they leave and land without copies).
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

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of a request's pages block first, every layer: [blocks, layers, 2, block_size, kv_heads, head_dim]."""
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

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


def split_ranges(count: int, num_pieces: int) -> list[tuple[int, int]]:
    """Split ``count`` stacked items (layers, blocks) into ``num_pieces`` near-equal ranges (first, end), in order.

    A stacked message cut this way lets the pieces' copies and sends overlap on the GPU; both
    ends of a link compute the same split from the two numbers in the header.
    """
    if not 1 <= num_pieces <= count:
        raise ValueError(f"cannot cut {count} items into {num_pieces} pieces")
    bounds = [count * i // num_pieces for i in range(num_pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def block_region(cache: PagedKVCache, block_ids: Sequence[int]) -> torch.Tensor | None:
    """The pool's own memory for ``block_ids``, block first [n, layers, 2, block_size, kv_heads, head_dim], if it is
    one contiguous range (consecutive blocks of a ``block_major`` pool); else None.

    A transport can send such pages, or receive into them, without a copy.
    """
    runs = block_runs(block_ids)
    if len(runs) != 1:
        return None
    _, first, length = runs[0]
    region = cache.by_block[first : first + length]
    return region if region.is_contiguous() else None


def gather_blocks(cache: PagedKVCache, block_ids: Sequence[int]) -> torch.Tensor:
    """Every layer's pages of ``block_ids``, block first: [n, layers, 2, block_size, kv_heads, head_dim], contiguous.

    The pool itself (no copy) where ``block_region`` allows, else a copy per run of consecutive
    blocks (``index_select`` beyond ``MAX_GATHER_RUNS`` runs).
    """
    region = block_region(cache, block_ids)
    return region if region is not None else _gather(cache.by_block, 0, block_ids)


def gather_block_pieces(cache: PagedKVCache, block_ids: Sequence[int],
                        pieces: Sequence[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor]]:
    """``gather_blocks`` of consecutive ranges of ``block_ids``, one at a time: yields (first position, pages).

    Lazily: a piece that needs a copy is copied only when asked for, so a caller that queues a
    send between pieces overlaps the copy of one with the send of the one before.
    """
    for first, end in pieces:
        yield first, gather_blocks(cache, block_ids[first:end])


def scatter_blocks(cache: PagedKVCache, block_ids: Sequence[int], pages: torch.Tensor, first: int = 0) -> None:
    """Write pages [n, layers, 2, block_size, kv_heads, head_dim] into blocks ``block_ids[first : first + n]``.

    One copy per run of consecutive blocks; nothing to do where ``pages`` already is that memory.
    """
    expected = (pages.shape[0] if pages.dim() == cache.kv.dim() else -1, *cache.by_block.shape[1:])
    if tuple(pages.shape) != expected or not 0 <= first <= len(block_ids) - pages.shape[0]:
        raise ValueError(f"pages of shape {tuple(pages.shape)} at position {first}; expected "
                         f"[n, {', '.join(map(str, cache.by_block.shape[1:]))}] with {first} + n <= {len(block_ids)}")
    pages = pages.to(device=cache.device, dtype=cache.dtype)
    target = cache.by_block
    for pos, block, length in block_runs(block_ids[first : first + pages.shape[0]]):
        destination = target[block : block + length]
        if destination.data_ptr() != pages[pos].data_ptr():
            copy_blocks(destination, pages[pos : pos + length])


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
