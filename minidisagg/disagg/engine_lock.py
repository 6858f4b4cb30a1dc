"""The decode engine's lock, fair to transport threads: they get in ahead of the decode loop's next step.

Python locks are not fair: a loop that releases and at once re-takes the lock can starve
transport threads (reserve, commit) for seconds. Callers announce themselves
(``transport_access``), and the loop lets them in before its next step (``let_waiters_in``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class FairEngineLock:
    """A re-entrant lock on the engine (``lock``) whose announced transport callers go ahead of the loop."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._num_waiting = 0
        self._waiting_lock = threading.Lock()
        self._no_waiters = threading.Event()
        self._no_waiters.set()

    @contextmanager
    def transport_access(self) -> Iterator[None]:
        """Hold the engine for a transport call, ahead of the decode loop's next step."""
        with self._waiting_lock:
            self._num_waiting += 1
            self._no_waiters.clear()
        try:
            with self.lock:
                yield
        finally:
            with self._waiting_lock:
                self._num_waiting -= 1
                if self._num_waiting == 0:
                    self._no_waiters.set()

    def let_waiters_in(self, grace_s: float) -> None:
        """Before the loop's next step: wait, at most ``grace_s``, until no announced caller waits for the lock."""
        self._no_waiters.wait(grace_s)
