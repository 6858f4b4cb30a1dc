"""Block allocator: hands out fixed-size KV blocks and keeps each sequence's block table.

With prefix caching (``kv/prefix_cache.py``) a block may sit in several tables at once: each
block counts the tables holding it, and a cached block whose count drops to zero stays cached
(evictable) instead of returning to the free list.
"""

from __future__ import annotations

import threading
from typing import Hashable, Optional, Protocol, Sequence

from minidisagg.kv.prefix_cache import PrefixCache, hash_chain


# Block ids as shared int objects (ids 0 .. n - 1 for the largest pool made so far): every pool's tables and free
# list refer to these, so a thousand pools that have cycled through their blocks hold pointers, not an int object
# per block each.
_BLOCK_IDS: list[int] = []
_BLOCK_IDS_LOCK = threading.Lock()  # pools made on several threads at once must not extend it twice


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


class TokenKVOwner(KVOwner, Protocol):
    """A ``KVOwner`` whose token ids can be read: what prefix caching hashes."""

    @property
    def all_token_ids(self) -> list[int]:
        """Every token of the sequence, in order."""


class BlockManager:
    """Free-list allocator over ``num_blocks`` blocks of ``block_size`` token slots.

    Sequences are identified by an opaque key (the engine uses the sequence id). A block
    table lists a sequence's blocks in token order; token ``i`` of the sequence lives in
    block ``table[i // block_size]`` at offset ``i % block_size``. With
    ``enable_prefix_caching``, full blocks whose KV is computed are cached by content
    (``cache_full_blocks``) and shared by later sequences with the same prefix
    (``cached_prefix``, then ``allocate_slots(..., cached_blocks=...)``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if not isinstance(num_blocks, int) or not isinstance(block_size, int) or num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # The free list, in the order blocks are handed out: blocks never used yet (``_fresh`` onwards, in
        # order: a pool of many blocks costs nothing to make), then freed ones in the order they came back,
        # ``_free[_head:]`` (a list read from ``_head`` on: runs of blocks are taken and given back by slices).
        if len(_BLOCK_IDS) < num_blocks:
            with _BLOCK_IDS_LOCK:  # _BLOCK_IDS[i] == i must hold
                _BLOCK_IDS.extend(range(len(_BLOCK_IDS), num_blocks))
        self._ids = _BLOCK_IDS
        self._fresh = 0
        self._free: list[int] = []
        self._head = 0
        self._tables: dict[object, list[int]] = {}
        # How many tables hold each block: only the prefix cache shares blocks; without it a block is in one
        # table or free, and nothing is counted per block.
        self._refs: Optional[list[int]] = [0] * num_blocks if enable_prefix_caching else None
        self.prefix_cache: Optional[PrefixCache] = PrefixCache() if enable_prefix_caching else None
        self._keys: dict[object, list[bytes]] = {}  # per sequence: keys of its leading full, computed blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence (free, or cached and evictable)."""
        free = self.num_blocks - self._fresh + len(self._free) - self._head
        return free + (self.prefix_cache.num_evictable_blocks if self.prefix_cache else 0)

    def ref_count(self, block: int) -> int:
        """How many sequences' tables hold ``block`` (without a prefix cache, 0 or 1, found by a scan of the tables)."""
        if self._refs is None:
            return int(any(block in table for table in self._tables.values()))
        return self._refs[block]

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

    def allocate_slots(self, seq: KVOwner, num_new_tokens: int, lookahead: int = 0,
                       cached_blocks: Sequence[int] = ()) -> Optional[list[int]]:
        """Give ``seq`` slots for ``num_new_tokens`` more tokens (plus ``lookahead``) past its computed ones.

        ``cached_blocks`` (from ``cached_prefix``, for a sequence that owns nothing yet) become the
        head of its table, shared, their tokens counted as computed before the new ones. All or
        nothing: returns the sequence's block table, or None, changing nothing, when the pool lacks
        the blocks. The scheduler asks through this; it never writes a block table itself.
        """
        if num_new_tokens < 0 or lookahead < 0:
            raise ValueError(f"num_new_tokens and lookahead must be >= 0, got {num_new_tokens}, {lookahead}")
        target = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens + lookahead
        if not cached_blocks:
            return self.grow(seq.seq_id, target) if self.can_grow(seq.seq_id, target) else None
        if seq.num_computed_tokens:
            raise ValueError(f"{seq.seq_id!r} already has KV: a cached prefix can only start a sequence")
        return self.share_prefix(seq.seq_id, cached_blocks, target)

    def share_prefix(self, seq_key: object, cached_blocks: Sequence[int], num_tokens: int,
                     spare_blocks: int = 0) -> Optional[list[int]]:
        """Start ``seq_key``'s table with ``cached_blocks`` (shared, one more reference each), grown to ``num_tokens``.

        All or nothing: None, changing nothing, when the pool lacks the other blocks plus
        ``spare_blocks`` left over. ValueError for blocks the prefix cache does not hold, or a key
        that owns blocks already.
        """
        cache = self.prefix_cache
        if cache is None or any(cache.key_of(b) is None for b in cached_blocks):
            raise ValueError("cached_blocks must be blocks the prefix cache holds (from cached_prefix)")
        if seq_key in self._tables:
            raise ValueError(f"{seq_key!r} already has KV: a cached prefix can only start a sequence")
        if len(cached_blocks) > self.blocks_needed(num_tokens):
            raise ValueError(f"{len(cached_blocks)} cached blocks are more than {num_tokens} tokens fill")
        refs = self._refs
        assert refs is not None  # a prefix cache counts references
        num_parked = sum(1 for b in cached_blocks if refs[b] == 0)  # sharing them takes them off the LRU
        if self.blocks_needed(num_tokens) - len(cached_blocks) + num_parked + spare_blocks > self.num_free_blocks:
            return None
        for block in cached_blocks:
            if refs[block] == 0:
                cache.unpark(block)
            refs[block] += 1
        self._tables[seq_key] = list(cached_blocks)
        self._keys[seq_key] = [cache.key_of(b) for b in cached_blocks]  # type: ignore[misc]
        return self.grow(seq_key, num_tokens)

    def holds_prefix_of(self, seq_key: object, token_ids: Sequence[int]) -> bool:
        """Whether the sequence's leading blocks with keys (shared from the cache) hold ``token_ids``' leading KV."""
        keys, bs = self._keys.get(seq_key, []), self.block_size
        return len(keys) * bs <= len(token_ids) and keys == hash_chain(token_ids, bs, len(keys))

    def cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest run of ``token_ids``' full blocks, always leaving the last token out.

        The last token is left to compute because sampling needs its logits. Nothing is taken:
        pass the result to ``allocate_slots`` to share the blocks. Empty without prefix caching.
        """
        if self.prefix_cache is None or not token_ids:
            return []
        return self.prefix_cache.match(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size)

    def cache_full_blocks(self, seq: TokenKVOwner) -> int:
        """Cache the sequence's full blocks whose KV is now computed; returns how many became cached.

        A block whose key another block already carries (two sequences computed the same prefix at
        once) stays uncached and returns to the free list when its sequence ends.
        """
        table = self._tables.get(seq.seq_id)
        if self.prefix_cache is None or not table:
            return 0
        keys = self._keys.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        if num_full <= len(keys):
            return 0
        bs = self.block_size
        tokens = seq.all_token_ids[len(keys) * bs:num_full * bs]
        new_keys = hash_chain(tokens, bs, num_full - len(keys), keys[-1] if keys else None)
        added = sum(self.prefix_cache.register(table[i], key) for i, key in enumerate(new_keys, start=len(keys)))
        keys.extend(new_keys)
        return added

    def grow(self, seq_key: object, num_tokens: int) -> list[int]:
        """Ensure the sequence owns enough blocks for ``num_tokens`` tokens; returns its table."""
        extra = self.num_extra_blocks(seq_key, num_tokens)
        if extra > self.num_free_blocks:
            raise OutOfBlocksError(f"need {extra} blocks, {self.num_free_blocks} free")
        if extra == 0:
            return self._tables.get(seq_key, [])
        table = self._tables.setdefault(seq_key, [])
        num_fresh = min(extra, self.num_blocks - self._fresh)
        if num_fresh:
            table.extend(self._ids[self._fresh:self._fresh + num_fresh])
            self._fresh += num_fresh
        rest = extra - num_fresh
        if rest:
            head, free = self._head, self._free
            take = min(rest, len(free) - head)  # then evict cached blocks, if the free list runs out
            table.extend(free[head:head + take])
            head += take
            if head > 4096 and 2 * head > len(free):  # drop the consumed front now and then: O(1) amortized
                del free[:head]
                head = 0
            self._head = head
            if take < rest:
                table.extend(self.prefix_cache.evict() for _ in range(rest - take))  # type: ignore[union-attr]
        refs = self._refs
        if refs is not None:
            for block in table[len(table) - extra:]:
                refs[block] = 1
        return table

    def free(self, seq_key: object) -> int:
        """Let go of all of the sequence's blocks; returns how many it held.

        A block no other sequence holds returns to the free list, or, if cached, stays cached as
        evictable: the sequence's last blocks are parked as the least recently used, so a chain
        is evicted from its tail and its head stays findable longest.
        """
        table = self._tables.pop(seq_key, [])
        keys = self._keys.pop(seq_key, [])
        refs, cache = self._refs, self.prefix_cache
        if refs is None or cache is None:  # no sharing: every block of the table is free again
            self._free.extend(table)
            return len(table)
        released = []
        for block in table:
            refs[block] -= 1
            if not refs[block]:
                released.append(block)
        for block, key in zip(table, keys):  # a copy computed twice gets its key now, if the cached twin was evicted
            if refs[block] == 0:
                cache.register(block, key)
        parked = {b for b in reversed(released) if cache.park(b)}
        self._free.extend(b for b in released if b not in parked)
        return len(table)

    def rename(self, old_key: object, new_key: object) -> list[int]:
        """Hand the blocks owned under ``old_key`` to ``new_key`` (a reservation becoming a sequence)."""
        if new_key in self._tables:
            raise ValueError(f"{new_key!r} already owns blocks")
        table = self._tables.pop(old_key, [])
        self._tables[new_key] = table
        if old_key in self._keys:
            self._keys[new_key] = self._keys.pop(old_key)
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
