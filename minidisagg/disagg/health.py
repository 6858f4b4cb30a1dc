"""A worker's engine loop that dies is a health failure, never a silent thread exit.

``LoopHealth.run`` runs a prefill or decode worker's loop. If anything escapes it, it logs the
traceback, records the error (the worker is unhealthy from then on), calls ``on_unhealthy``
with the reason, lets the worker fail every request it holds and free their KV blocks, and
finally sets ``dead``.

Why this design: the router already has one way to learn that a worker is gone (a worker's
``error`` for in-process workers, a lost connection for remote ones) and already fails or
recomputes that worker's requests per ``kv_failure_policy``. A dead loop now feeds that same
path, at once: ``error`` is set for in-process clusters, and a server turns ``on_unhealthy`` into
a HEALTH frame to every router (``serve``). The router must hear first, so it never reroutes a
failed request back to the worker that failed it; hence the order. The worker still fails its
requests and frees their blocks itself, because an in-process worker cannot exit and its pool
must stay whole; ``minidisagg serve`` then exits non-zero, so a supervisor sees the failure too
and no port stays open for a worker that no longer works.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)


class LoopHealth:
    """Whether a worker's engine loop is alive, and what happens when it is not (module docstring)."""

    def __init__(self, worker_desc: str) -> None:
        self.worker_desc = worker_desc  # e.g. "decode worker d0", for messages
        self.error: Optional[BaseException] = None
        self.on_unhealthy: Optional[Callable[[str], None]] = None  # told once, first, with the reason
        self.dead = threading.Event()  # set once a failed loop's requests were failed
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        """Whether the loop has not failed (it may not have started yet)."""
        return self.error is None

    @property
    def reason(self) -> Optional[str]:
        """Why the loop failed (None while healthy)."""
        return None if self.error is None else f"{self.worker_desc} failed: {type(self.error).__name__}: {self.error}"

    def check(self) -> None:
        """Raise ValueError when the loop has failed: such a worker takes no new work."""
        if self.error is not None:
            raise ValueError(f"{self.worker_desc} is unhealthy: {self.reason}")

    def guard(self) -> threading.Lock:
        """A lock under which admitting work and failing the loop do not interleave."""
        return self._lock

    def run(self, loop: Callable[[], None], fail_held: Callable[[str], None]) -> None:
        """Run ``loop``; if it raises, turn unhealthy, tell ``on_unhealthy``, then ``fail_held(reason)``."""
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - whatever killed the loop, the requests must not hang
            log.exception("%s: the engine loop failed", self.worker_desc)
            with self._lock:
                self.error = exc
            reason = self.reason or ""
            if self.on_unhealthy is not None:
                try:
                    self.on_unhealthy(reason)
                except Exception:  # noqa: BLE001 - the requests must still be failed
                    log.exception("%s: announcing the failure failed", self.worker_desc)
            try:
                fail_held(reason)
            finally:
                self.dead.set()
