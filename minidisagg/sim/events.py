"""The simulator's event loop: a ``heapq`` of (time, priority, order) keys, run in time order.

Why ``heapq`` and not simpy: the simulator's entities are not processes that wait on one another
but step machines (an instance's next step, a link's next completion, an arrival), each with at
most one pending event that is superseded when something changes. A heap of plain tuples is what
the engine's own step loop uses for arrivals (``LLMEngine._pending``), costs nothing to install,
and is the fastest structure CPython offers for it; simpy's generators and events would add a
call layer per event, which at a million requests is most of the budget.

Ties are broken by ``priority`` (lower first), then by push order, so a run is deterministic:
at one instant, link completions (0) come before arrivals and hand-offs into instances (1),
which come before instance steps (2). An instance step at time t therefore sees every request
that reached the instance at t, as ``LLMEngine.step`` admits arrivals up to its clock's now.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Callable

LINK = 0
INPUT = 1
STEP = 2

Handler = Callable[[float, Any], None]


class EventLoop:
    """A time-ordered queue of callbacks; ``run`` pops them until none are left."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Handler, Any]] = []
        self._order = itertools.count()
        self.now_s = 0.0
        self.num_events = 0

    def push(self, t_s: float, priority: int, handler: Handler, arg: Any = None) -> None:
        """Call ``handler(t_s, arg)`` at ``t_s`` (never before the current time)."""
        if not self.now_s <= t_s < math.inf:  # also refuses NaN
            raise ValueError(f"an event at {t_s} s is before the loop's time {self.now_s} s (or not finite)")
        heapq.heappush(self._heap, (t_s, priority, next(self._order), handler, arg))

    def run(self) -> None:
        """Process events in order until the queue is empty."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        try:
            while heap:
                t_s, _, _, handler, arg = pop(heap)
                self.now_s = t_s
                n += 1
                handler(t_s, arg)
        finally:
            self.num_events += n
