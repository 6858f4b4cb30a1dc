"""Block allocator: hands out fixed-size KV blocks and keeps each sequence's block table."""

from __future__ import annotations

from collections import deque
from typing import Hashable, Optional, Protocol


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation is attempted without enough free blocks (check first)."""


class KVOwner(Protocol):
    """What ``allocate_slots`` reads of a sequence: the key its blocks are held under, and its KV progress."""

    @property
    def seq_id(self) -> Hashable:
        """The key this sequence's blocks are held under."""

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is already in the pool."""


class BlockManager:
    """Free-list allocator over ``num_blocks`` blocks of ``block_size`` token slots.

    Sequences are identified by an opaque key (the engine uses the sequence id). A block
    table lists a sequence's blocks in token order; token ``i`` of the sequence lives in
    block ``table[i // block_size]`` at offset ``i % block_size``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or not isinstance(block_size, int) or num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[object, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the whole pool."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_key: object) -> list[int]:
        """The sequence's block table (empty if it owns nothing)."""
        return self._tables.get(seq_key, [])

    def num_extra_blocks(self, seq_key: object, num_tokens: int) -> int:
        """How many more blocks the sequence needs to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_needed(num_tokens) - len(self.block_table(seq_key)))

    def can_grow(self, seq_key: object, num_tokens: int) -> bool:
        """Whether the sequence can be grown to ``num_tokens`` tokens now."""
        return self.num_extra_blocks(seq_key, num_tokens) <= self.num_free_blocks

    def allocate_slots(self, seq: KVOwner, num_new_tokens: int, lookahead: int = 0) -> Optional[list[int]]:
        """Give ``seq`` slots for ``num_new_tokens`` more tokens (plus ``lookahead``) past its computed ones.

        All or nothing: returns the sequence's block table, or None, changing nothing, when the pool
        lacks the blocks. The scheduler asks through this; it never writes a block table itself.
        """
        if num_new_tokens < 0 or lookahead < 0:
            raise ValueError(f"num_new_tokens and lookahead must be >= 0, got {num_new_tokens}, {lookahead}")
        target = seq.num_computed_tokens + num_new_tokens + lookahead
        if not self.can_grow(seq.seq_id, target):
            return None
        return self.grow(seq.seq_id, target)

    def grow(self, seq_key: object, num_tokens: int) -> list[int]:
        """Ensure the sequence owns enough blocks for ``num_tokens`` tokens; returns its table."""
        extra = self.num_extra_blocks(seq_key, num_tokens)
        if extra > self.num_free_blocks:
            raise OutOfBlocksError(f"need {extra} blocks, {self.num_free_blocks} free")
        if extra == 0:
            return self._tables.get(seq_key, [])
        table = self._tables.setdefault(seq_key, [])
        for _ in range(extra):
            table.append(self._free.popleft())
        return table

    def free(self, seq_key: object) -> int:
        """Return all of the sequence's blocks to the pool; returns how many were freed."""
        table = self._tables.pop(seq_key, [])
        self._free.extend(table)
        return len(table)

    def rename(self, old_key: object, new_key: object) -> list[int]:
        """Hand the blocks owned under ``old_key`` to ``new_key`` (a reservation becoming a sequence)."""
        if new_key in self._tables:
            raise ValueError(f"{new_key!r} already owns blocks")
        table = self._tables.pop(old_key, [])
        self._tables[new_key] = table
        return table

    def owners(self) -> list[object]:
        """Keys of sequences that currently own blocks."""
        return list(self._tables)

    def slot_mapping(self, seq_key: object, start: int, end: int) -> list[int]:
        """Flat cache slots of tokens ``start..end-1`` of the sequence."""
        table = self.block_table(seq_key)
        bs = self.block_size
        if self.blocks_needed(end) > len(table):
            raise ValueError(f"tokens up to {end} need {self.blocks_needed(end)} blocks, sequence has {len(table)}")
        return [table[i // bs] * bs + i % bs for i in range(start, end)]
