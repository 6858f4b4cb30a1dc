"""When to try again: exponential backoff with jitter, a cap and an overall deadline.

A link that broke is reconnected after waits that double from ``initial_s`` up to ``max_s``.
Each wait is drawn between half its bound and the bound ("equal jitter"): many prefill workers
that lost the same decode worker at once then spread their attempts out instead of knocking
together, while no wait is shorter than half the schedule's. After ``deadline_s`` since the
link broke, the link stays down and its transfers fail for good.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from minidisagg.config import LinkConfig

ATTEMPT_TIMEOUT_S = 5.0  # one reconnect attempt (TCP connect, then the handshake) may take this long


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a broken link is re-established (``LinkConfig`` validates the numbers)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    deadline_s: float = 60.0
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S

    @classmethod
    def of(cls, link: LinkConfig) -> "ReconnectPolicy":
        """The policy a ``LinkConfig`` asks for."""
        return cls(link.reconnect_initial_s, link.reconnect_max_s, link.reconnect_deadline_s)

    @property
    def enabled(self) -> bool:
        """Whether a broken link is re-established at all (``deadline_s`` > 0)."""
        return self.deadline_s > 0

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The waits before attempt 1, 2, ...: bound doubling from ``initial_s`` to ``max_s``, each in [bound/2, bound].

        Endless: the caller stops at ``deadline_s`` (it also counts the attempts' own time).
        """
        bound_s = self.initial_s
        while True:
            yield rng.uniform(bound_s / 2, bound_s)
            bound_s = min(self.max_s, bound_s * 2)
