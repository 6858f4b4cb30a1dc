"""Cache-aware routing: which block keys each worker likely holds, and which worker a prompt should go to.

**Inferred, not reported.** The router computes each prompt's block hash chain with the prefix
cache's own ``hash_chain`` (the keys a worker's ``PrefixCache`` files the blocks under) and records,
per worker, the keys of every prompt it routed there. It never asks the workers what they hold:
the router already sees every prompt, the index costs no messages and no extra protocol, and it
works the same over inproc, socket and torch.distributed workers. The price is that it can be
wrong; two things keep it close:

- A worker's pool is finite. Each worker's index is an LRU of at most the worker's pool size in
  keys (``resize``: the pool's ``num_blocks``, from the worker itself or its HEALTH reports), so
  it forgets what the worker has most likely evicted. Keys are touched tail first, so a chain's
  head is the most recently used and, as in ``BlockManager.free``, a chain is forgotten from its tail.
- A worker that fails is forgotten whole (``forget``): one that comes back may have lost its cache.

What stays approximate: the pool also holds the blocks of requests being prefilled, so a worker
evicts a little earlier than the index forgets (the index overestimates), and a prefill that
fails never cached its blocks. ``predicted_hit_rate`` (the router's) beside the cluster's realised
``prefix_hit_rate`` shows how far apart they are.

**The score** of worker ``w`` for a prompt, in blocks::

    score(w) = overlap_blocks(w) - load_weight * queued_tokens(w) / block_size

``overlap_blocks`` is the longest run of the prompt's leading keys in ``w``'s index (at most
``(len(prompt) - 1) // block_size``: the last token is always computed); ``queued_tokens`` is the
prompt tokens routed to ``w`` that it has not finished prefilling, less what they were predicted
to find cached. With the default ``load_weight = 1`` the score is, up to a constant, minus the
tokens ``w`` must compute before this prompt's first token: a cached block saves ``block_size``
tokens of prefill and a queued token costs one. The estimate ignores that a worker batches its
queue (which makes queued tokens cheaper than that) and that attention grows with the prefix,
so a weight below 1 leans towards cache affinity. ``load_weight = 0`` ignores load entirely.
The highest score wins; ties go to the smaller queue, then to the worker whose index holds fewer
keys (the emptier cache: a prompt that matches nowhere starts its prefix where it evicts least,
as SGLang's router sends such prompts to the smallest tree), then to the lower index.

**The decode side** uses the same index and the same score, one ``CacheAwareIndex`` per side. A
decode worker with prefix caching shares the cached blocks of a prompt's leading full blocks
(``decode_reservations``): their pages do not travel and take no new pool blocks. Its load is in
the same unit, KV tokens over ``block_size`` (blocks): the tokens its requests in flight hold in its
pool (prompt less the predicted reuse, plus the tokens generated so far). Blocks, not requests,
because the pool is what a decode worker runs out of (a full pool refuses reservations and evicts
the very prefixes the index counts on), because a cached block saves exactly one block of that
pool and of the wire, and because a decode step reads every held block's KV, so its step time
grows with the blocks held, not with the count of requests. With ``load_weight = 1`` a worker
busier by more blocks than the prompt's overlap loses to an idle one: a flood of one prefix copies
the prefix to a second worker instead of queueing all of it on one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from minidisagg.kv.prefix_cache import hash_chain

DEFAULT_INDEX_BLOCKS = 4096  # a worker's index size until its pool size is known


def prompt_block_keys(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The keys of the prompt's full blocks, as the workers' prefix caches compute them."""
    return hash_chain(token_ids, block_size, len(token_ids) // block_size)


def worker_pool_blocks(worker: object) -> Optional[int]:
    """A worker's KV pool size: its engine's (inproc) or its latest HEALTH report's; None if unknown."""
    engine = getattr(worker, "engine", None)
    if engine is not None:
        return engine.blocks.num_blocks
    num_blocks = (getattr(worker, "last_health", None) or {}).get("num_blocks")
    return num_blocks if isinstance(num_blocks, int) and num_blocks > 0 else None


def _check_blocks(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (KV blocks), got {value!r}")
    return value


class WorkerPrefixIndex:
    """The block keys one worker likely holds: an LRU of at most ``capacity_blocks`` keys."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = _check_blocks("capacity_blocks", capacity_blocks)
        self._keys: OrderedDict[bytes, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        """How many keys the index holds."""
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        """Whether the worker is thought to hold the block with this key."""
        return key in self._keys

    def overlap_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are all in the index."""
        n = 0
        for key in keys:
            if key not in self._keys:
                break
            n += 1
        return n

    def insert(self, keys: Sequence[bytes]) -> None:
        """The worker is computing (or reusing) these blocks: mark them most recently used, head last."""
        for key in reversed(keys):
            self._keys[key] = None
            self._keys.move_to_end(key)
        self._shrink()

    def resize(self, capacity_blocks: int) -> None:
        """The worker's pool holds ``capacity_blocks``: forget the least recently used keys beyond it."""
        self.capacity_blocks = _check_blocks("capacity_blocks", capacity_blocks)
        self._shrink()

    def clear(self) -> None:
        """Forget every key (the worker failed: what it held is unknown)."""
        self._keys.clear()

    def _shrink(self) -> None:
        while len(self._keys) > self.capacity_blocks:
            self._keys.popitem(last=False)


@dataclass(frozen=True)
class CacheAwareChoice:
    """Where one prompt went and what the router expects it to find cached there."""

    worker: int
    overlap_blocks: int
    predicted_cached_tokens: int
    score_blocks: float


class CacheAwareIndex:
    """One ``WorkerPrefixIndex`` per worker of one side (prefill or decode), the scoring rule, the predicted hits."""

    def __init__(self, num_workers: int, block_size: int, capacity_blocks: int = DEFAULT_INDEX_BLOCKS,
                 load_weight: float = 1.0) -> None:
        self.block_size = _check_blocks("block_size", block_size)
        if isinstance(load_weight, bool) or not isinstance(load_weight, (int, float)) \
                or not math.isfinite(load_weight) or load_weight < 0:
            raise ValueError(f"load_weight must be a finite number >= 0, got {load_weight!r}")
        self.load_weight = float(load_weight)
        self.workers = [WorkerPrefixIndex(capacity_blocks) for _ in range(num_workers)]
        self.num_prompt_tokens = 0  # over every prompt routed
        self.num_predicted_cached_tokens = 0

    @property
    def predicted_hit_rate(self) -> float:
        """Prompt tokens the router expected to be cached where it sent them, over all prompt tokens routed."""
        return self.num_predicted_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    def choose(self, token_ids: Sequence[int], alive: Sequence[int], queued_tokens: Sequence[int]) -> CacheAwareChoice:
        """Score every alive worker for this prompt, record its blocks on the best one, and return the choice.

        ``queued_tokens``: each worker's load in tokens (prefill: prompt tokens still to compute;
        decode: KV tokens its requests in flight hold), divided by ``block_size`` in the score.
        """
        if not alive:
            raise ValueError("no worker to choose from")
        if len(queued_tokens) != len(self.workers):
            raise ValueError(f"queued_tokens has {len(queued_tokens)} entries for {len(self.workers)} workers")
        keys = prompt_block_keys(token_ids, self.block_size)
        max_blocks = max(0, (len(token_ids) - 1) // self.block_size)
        best: Optional[tuple[tuple[float, int, int, int], CacheAwareChoice]] = None
        for w in alive:
            overlap = min(self.workers[w].overlap_blocks(keys), max_blocks)
            score = overlap - self.load_weight * queued_tokens[w] / self.block_size
            rank = (-score, queued_tokens[w], len(self.workers[w]), w)
            if best is None or rank < best[0]:
                best = (rank, CacheAwareChoice(w, overlap, overlap * self.block_size, score))
        assert best is not None
        choice = best[1]
        self.workers[choice.worker].insert(keys)
        self.num_prompt_tokens += len(token_ids)
        self.num_predicted_cached_tokens += choice.predicted_cached_tokens
        return choice
