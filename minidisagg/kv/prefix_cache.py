"""Automatic prefix caching: full KV blocks found again by a hash chain over their token ids.

Block ``i`` of a sequence is keyed by ``hash(key of block i-1, token ids of block i)``, so a key
names a block's tokens *and* everything before them: two sequences share block ``i`` exactly
when their first ``(i + 1) * block_size`` tokens agree. The hash is BLAKE2b over the token ids
as little-endian 64-bit integers, the same in every process (Python's ``hash()`` is salted).

A cached block outlives its sequence. While no sequence holds it, it waits in an LRU list and is
handed out again (its key forgotten) only when the free list is empty, least recently used first.
The ``BlockManager`` owns the reference counts; this class only maps keys and keeps the LRU.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Optional, Sequence

BLOCK_HASH_BYTES = 16


def hash_block(parent: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """The key of a full block: BLAKE2b over its parent's key (none for the first block) and its token ids."""
    h = hashlib.blake2b(digest_size=BLOCK_HASH_BYTES)
    h.update(b"\x00" if parent is None else b"\x01" + parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def hash_chain(token_ids: Sequence[int], block_size: int, num_blocks: int,
               parent: Optional[bytes] = None) -> list[bytes]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``, chained from ``parent``."""
    if num_blocks * block_size > len(token_ids):
        raise ValueError(f"{num_blocks} full blocks of {block_size} need {num_blocks * block_size} tokens, "
                         f"got {len(token_ids)}")
    keys: list[bytes] = []
    for i in range(num_blocks):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys


class PrefixCache:
    """Maps block keys to block ids, and keeps the cached blocks that no sequence holds in LRU order."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a key (held by sequences or not)."""
        return len(self._key_of)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no sequence holds: reusable, but kept until the free list runs out."""
        return len(self._evictable)

    def evictable_blocks(self) -> list[int]:
        """The cached blocks no sequence holds, least recently used first."""
        return list(self._evictable)

    def key_of(self, block: int) -> Optional[bytes]:
        """The key a block is cached under, or None."""
        return self._key_of.get(block)

    def block_of(self, key: bytes) -> Optional[int]:
        """The block cached under ``key``, or None."""
        return self._block_of.get(key)

    def match(self, token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
        """Blocks of the longest run of ``token_ids``' leading full blocks (at most ``max_blocks``) all cached."""
        blocks: list[int] = []
        key: Optional[bytes] = None
        for i in range(min(max_blocks, len(token_ids) // block_size)):
            key = hash_block(key, token_ids[i * block_size:(i + 1) * block_size])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def match_keys(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks of the longest leading run of ``keys`` (a hash chain another process computed) all cached."""
        blocks: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, block: int, key: bytes) -> bool:
        """Cache ``block`` (its KV computed) under ``key``; False if the key has a block already, or the block a key."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def park(self, block: int) -> bool:
        """A block's last holder let go: keep it as most recently used if it is cached (True), else False."""
        if block not in self._key_of:
            return False
        self._evictable[block] = None
        self._evictable.move_to_end(block)
        return True

    def unpark(self, block: int) -> None:
        """A sequence takes a parked block again: it is no longer evictable."""
        self._evictable.pop(block, None)

    def evict(self) -> int:
        """Forget the least recently used parked block and return it for reuse; KeyError if none is parked."""
        if not self._evictable:
            raise KeyError("no cached block is free to evict")
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block
