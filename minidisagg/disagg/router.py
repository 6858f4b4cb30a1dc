"""The router: picks a prefill worker and a decode worker for each request (xPyD)."""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

RoutingPolicy = Callable[[Sequence[int]], int]
ROUTING_POLICIES = ("round_robin", "least_loaded")


class Router:
    """Assigns requests over ``num_prefill`` x ``num_decode`` workers by round robin or least load."""

    def __init__(self, num_prefill: int, num_decode: int, policy: str = "round_robin") -> None:
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(f"need at least one prefill and one decode worker, got {num_prefill}P{num_decode}D")
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; known: {list(ROUTING_POLICIES)}")
        self.policy = policy
        self.num_prefill = num_prefill
        self.num_decode = num_decode
        self._next_prefill = itertools.cycle(range(num_prefill))
        self._next_decode = itertools.cycle(range(num_decode))

    def pick(self, prefill_loads: Sequence[int], decode_loads: Sequence[int],
             exclude_prefill: Sequence[int] = (), exclude_decode: Sequence[int] = ()) -> tuple[int, int]:
        """(prefill index, decode index) for the next request, skipping the dead workers listed."""
        alive_p = [i for i in range(self.num_prefill) if i not in exclude_prefill]
        alive_d = [i for i in range(self.num_decode) if i not in exclude_decode]
        if not alive_p or not alive_d:
            raise RuntimeError(f"no {'prefill' if not alive_p else 'decode'} worker is alive")
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
