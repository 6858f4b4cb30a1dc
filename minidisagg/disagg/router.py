"""The router: picks a prefill worker and a decode worker for each request (xPyD)."""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

from minidisagg.disagg.prefix_index import DEFAULT_INDEX_BLOCKS, CacheAwareChoice, CacheAwareIndex

RoutingPolicy = Callable[[Sequence[int]], int]
LOAD_POLICIES = ("round_robin", "least_loaded")  # those that look at loads alone
ROUTING_POLICIES = (*LOAD_POLICIES, "cache_aware")


class Router:
    """Assigns requests over ``num_prefill`` x ``num_decode`` workers by round robin, least load or cached prefix.

    ``cache_aware`` (``prefix_index`` says how and why) sends a prompt to the prefill worker
    with the longest cached prefix, balanced against its queue, and to the decode worker likewise,
    balanced against the KV it holds; it needs the KV ``block_size`` of the workers and, in
    ``pick``, the prompt's token ids. ``side`` arguments name the workers' kind: "prefill" or "decode".
    """

    def __init__(self, num_prefill: int, num_decode: int, policy: str = "round_robin",
                 block_size: Optional[int] = None, index_blocks: int = DEFAULT_INDEX_BLOCKS,
                 load_weight: float = 1.0) -> None:
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(f"need at least one prefill and one decode worker, got {num_prefill}P{num_decode}D")
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; known: {list(ROUTING_POLICIES)}")
        self.policy = policy
        self.num_prefill = num_prefill
        self.num_decode = num_decode
        self._next_prefill = itertools.cycle(range(num_prefill))
        self._next_decode = itertools.cycle(range(num_decode))
        self.cache_index: Optional[CacheAwareIndex] = None  # cache_aware: the prefill workers'
        self.decode_index: Optional[CacheAwareIndex] = None  # cache_aware: the decode workers'
        self.last_choice: Optional[CacheAwareChoice] = None  # cache_aware: the latest pick's overlap and score
        self.last_decode_choice: Optional[CacheAwareChoice] = None  # ... on the decode side
        if policy == "cache_aware":
            if block_size is None:
                raise ValueError("routing='cache_aware' needs the workers' KV block_size (Router(..., block_size=...))")
            self.cache_index = CacheAwareIndex(num_prefill, block_size, index_blocks, load_weight)
            self.decode_index = CacheAwareIndex(num_decode, block_size, index_blocks, load_weight)

    @property
    def predicted_hit_rate(self) -> Optional[float]:
        """cache_aware: prompt tokens expected to be found cached over all routed; None for the other policies."""
        return None if self.cache_index is None else self.cache_index.predicted_hit_rate

    @property
    def predicted_decode_reuse_rate(self) -> Optional[float]:
        """cache_aware: prompt tokens expected in the chosen decode worker's cache (their KV not sent), over all."""
        return None if self.decode_index is None else self.decode_index.predicted_hit_rate

    def _index(self, side: str) -> Optional[CacheAwareIndex]:
        if side not in ("prefill", "decode"):
            raise ValueError(f"side must be 'prefill' or 'decode', got {side!r}")
        return self.cache_index if side == "prefill" else self.decode_index

    def resize(self, worker: int, pool_blocks: Optional[int], side: str = "prefill") -> None:
        """cache_aware: that worker's KV pool holds ``pool_blocks`` (None: unknown, no change)."""
        index = self._index(side)
        if index is not None and pool_blocks is not None and index.workers[worker].capacity_blocks != pool_blocks:
            index.workers[worker].resize(pool_blocks)

    def forget(self, worker: int, side: str = "prefill") -> None:
        """cache_aware: that worker failed; whatever it cached is no longer assumed."""
        index = self._index(side)
        if index is not None:
            index.workers[worker].clear()

    def pick(self, prefill_loads: Sequence[int], decode_loads: Sequence[int],
             exclude_prefill: Sequence[int] = (), exclude_decode: Sequence[int] = (),
             prompt_token_ids: Optional[Sequence[int]] = None) -> tuple[int, int]:
        """(prefill index, decode index) for the next request, skipping the dead workers listed.

        Loads are requests in flight per worker, except that cache_aware reads ``prefill_loads``
        as the prompt tokens each prefill worker has still to compute and ``decode_loads`` as the
        KV tokens each decode worker's requests in flight hold.
        """
        alive_p = [i for i in range(self.num_prefill) if i not in exclude_prefill]
        alive_d = [i for i in range(self.num_decode) if i not in exclude_decode]
        if not alive_p or not alive_d:
            raise RuntimeError(f"no {'prefill' if not alive_p else 'decode'} worker is alive")
        if self.cache_index is not None and self.decode_index is not None:
            if prompt_token_ids is None:
                raise ValueError("routing='cache_aware' needs the prompt: pick(..., prompt_token_ids=...)")
            if len(decode_loads) != self.num_decode:  # checked before either index records the prompt
                raise ValueError(f"decode_loads has {len(decode_loads)} entries for {self.num_decode} workers")
            self.last_choice = self.cache_index.choose(prompt_token_ids, alive_p, prefill_loads)
            self.last_decode_choice = self.decode_index.choose(prompt_token_ids, alive_d, decode_loads)
            return self.last_choice.worker, self.last_decode_choice.worker
        if self.policy == "least_loaded":
            p = min(alive_p, key=lambda i: (prefill_loads[i], i))
            d = min(alive_d, key=lambda i: (decode_loads[i], i))
            return p, d
        p = next(self._next_prefill)
        while p not in alive_p:
            p = next(self._next_prefill)
        d = next(self._next_decode)
        while d not in alive_d:
            d = next(self._next_decode)
        return p, d
