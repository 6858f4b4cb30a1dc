"""Picking an instance for each request: round robin, or least loaded (fewest unfinished requests, lowest index).

The policies and their tie-breaking are those of ``disagg.router.Router`` (the real router, which
``tests/test_sim.py`` checks this against); what differs is the data structure. The real router
scans every worker per request, which is right for a handful; over a thousand instances the scan
would cost more than simulating the request, so least-loaded keeps a heap of (load, index) with
stale entries skipped, O(log n) a pick.
"""

from __future__ import annotations

import heapq

from minidisagg.disagg.router import LOAD_POLICIES


class InstancePicker:
    """Chooses one of ``num_instances`` and tracks their loads (requests routed there and not yet finished)."""

    def __init__(self, num_instances: int, policy: str = "round_robin") -> None:
        if num_instances < 1:
            raise ValueError(f"need at least one instance, got {num_instances}")
        if policy not in LOAD_POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; the simulator knows {list(LOAD_POLICIES)}")
        self.policy = policy
        self.loads = [0] * num_instances
        self._next = 0
        self._heap = [(0, i) for i in range(num_instances)]

    def pick(self) -> int:
        """The next request's instance; its load goes up by one."""
        if self.policy == "round_robin":
            i = self._next
            self._next = (i + 1) % len(self.loads)
        else:
            heap, loads = self._heap, self.loads
            while heap[0][0] != loads[heap[0][1]]:
                heapq.heappop(heap)  # stale: that instance's load has changed since
            i = heap[0][1]
            loads[i] += 1
            heapq.heapreplace(heap, (loads[i], i))  # the entry just read is stale now: its successor replaces it
            return i
        self._change(i, 1)
        return i

    def done(self, i: int) -> None:
        """A request routed to instance ``i`` has finished."""
        if self.loads[i] < 1:
            raise ValueError(f"instance {i} has no unfinished request to finish")
        self._change(i, -1)

    def _change(self, i: int, delta: int) -> None:
        self.loads[i] += delta
        if self.policy == "least_loaded":
            heapq.heappush(self._heap, (self.loads[i], i))
            if len(self._heap) > 4 * len(self.loads):  # stale entries that never reach the top: rebuild, O(1) amortized
                self._heap = [(load, j) for j, load in enumerate(self.loads)]
                heapq.heapify(self._heap)
