"""Outputs to subscribers through bounded queues, so a slow reader never stalls the producer.

Who subscribes: routers to a worker's outputs (``Subscribers``, used by ``serve``), and clients
to a router's reply lines (``router_server``). Writing to a socket blocks once its peer stops
reading and the kernel's buffers fill; done on the engine loop, one stuck reader would stall
decode for everyone, and the KV links behind it. So each subscriber gets an ``Outbox``: a queue
of at most ``subscriber_queue_size`` messages (``LinkConfig``) and a sender thread of its own.
``put`` never blocks. A subscriber whose queue overflows, or whose write fails, is dropped:
its socket is shut down, the drop is logged, and its owner's ``on_drop`` fails or aborts its
requests so their KV blocks are freed. Everyone else keeps receiving.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Collection, Generic, Optional, TypeVar

from minidisagg.transport.framing import FrameError, FrameKind, send_frame

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # a sender thread with nothing to write looks again this often
T = TypeVar("T")


def shutdown_quietly(sock: socket.socket) -> None:
    """Shut a socket down both ways (wakes any thread blocked on it); never raises."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Outbox(Generic[T]):
    """A bounded queue of messages for one subscriber, written out in order by its own sender thread.

    ``write`` sends one message (it may block; an OSError drops the subscriber). ``interrupt``
    wakes a ``write`` blocked on a subscriber that is being dropped (shut its socket down).
    ``on_drop(reason)`` runs once, on the sender thread, when the subscriber is dropped;
    ``on_exit()`` runs as the sender thread ends, whatever the reason.
    """

    def __init__(self, name: str, write: Callable[[T], None], max_messages: int, interrupt: Callable[[], None],
                 on_drop: Callable[[str], None], on_exit: Callable[[], None] = lambda: None) -> None:
        if max_messages < 1:
            raise ValueError(f"an outbox holds at least 1 message, got max_messages={max_messages}")
        self.name = name
        self.max_messages = max_messages
        self.dropped: Optional[str] = None  # why the subscriber was dropped
        self._write, self._interrupt, self._on_drop, self._on_exit = write, interrupt, on_drop, on_exit
        self._queue: deque[T] = deque()
        self._cond = threading.Condition()
        self._closing = False  # write what is queued, then end
        self._abandoned = False  # end now: the connection is going away anyway
        self._thread = threading.Thread(target=self._run, name=f"outbox-{name}", daemon=True)

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def put(self, message: T) -> bool:
        """Queue a message without blocking; False if the subscriber is (now) dropped or closing."""
        with self._cond:
            if self.dropped is not None or self._closing:
                return False
            if len(self._queue) >= self.max_messages:
                self.dropped = (f"its output queue overflowed: {self.max_messages} messages unread "
                                f"(subscriber_queue_size={self.max_messages})")
                self._queue.clear()
                self._cond.notify()
            else:
                self._queue.append(message)
                self._cond.notify()
                return True
        self._interrupt()  # a write blocked on this subscriber returns at once
        return False

    def close(self) -> None:
        """End after the messages already queued are written."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def abandon(self) -> None:
        """End now, discarding what is queued (the connection is closing); a write failing from now on is no drop."""
        with self._cond:
            self._abandoned = True
            self._queue.clear()
            self._cond.notify()

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the sender thread to end."""
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _next(self) -> Optional[T]:
        """The next message to write, or None when the thread should end."""
        with self._cond:
            while not self._queue and not self._closing and not self._abandoned and self.dropped is None:
                self._cond.wait(IDLE_WAIT_S)
            if self._abandoned or self.dropped is not None or not self._queue:
                return None
            return self._queue.popleft()

    def _run(self) -> None:
        try:
            while (message := self._next()) is not None:
                try:
                    self._write(message)
                except (OSError, FrameError) as exc:  # gone, reset, or timed out: nobody reads this subscriber
                    with self._cond:
                        if self.dropped is None and not self._abandoned:
                            self.dropped = f"writing to it failed: {exc}"
                    break
            with self._cond:  # a drop decided before the connection went away is still reported
                reason = self.dropped
            if reason is not None:
                log.warning("dropping subscriber %s: %s", self.name, reason)
                self._interrupt()
                self._on_drop(reason)
        except Exception:  # noqa: BLE001 - a bug here must not leave the subscriber half alive
            log.exception("subscriber %s: the sender thread failed", self.name)
            self._interrupt()
        finally:
            self._on_exit()


class Subscribers:
    """Router connections that want a worker's outputs, each behind its own ``Outbox`` of frames.

    ``on_drop(peer, reason, num_left)`` runs (on that subscriber's sender thread) when one is
    dropped for falling behind or failing a write; ``num_left`` subscribers remain.
    """

    def __init__(self, queue_size: int, on_drop: Optional[Callable[[str, str, int], None]] = None) -> None:
        self.queue_size = queue_size
        self.on_drop = on_drop
        self._outboxes: dict[socket.socket, Outbox[tuple[FrameKind, dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._outboxes)

    def add(self, sock: socket.socket, peer: str = "") -> None:
        """Subscribe ``sock``: from now on it gets every broadcast frame, through its own queue."""
        name = f"router {peer}" if peer else "a router"

        def write(frame: tuple[FrameKind, dict[str, Any]]) -> None:
            send_frame(sock, frame[0], frame[1])  # the socket's own timeout bounds a stuck write

        def dropped(reason: str) -> None:
            with self._lock:
                self._outboxes.pop(sock, None)
                num_left = len(self._outboxes)
            if self.on_drop is not None:
                self.on_drop(name, reason, num_left)

        outbox: Outbox[tuple[FrameKind, dict[str, Any]]] = Outbox(name, write, self.queue_size,
                                                                  lambda: shutdown_quietly(sock), dropped)
        with self._lock:
            self._outboxes[sock] = outbox
        outbox.start()

    def close(self, timeout_s: float) -> None:
        """Write out what is queued for every subscriber (within ``timeout_s`` in all), then stop."""
        with self._lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.close()
        deadline_s = time.monotonic() + timeout_s
        for outbox in outboxes:
            outbox.join(max(0.0, deadline_s - time.monotonic()))

    def remove(self, sock: socket.socket) -> None:
        """Unsubscribe ``sock`` (its connection is closing): what is still queued for it is discarded."""
        with self._lock:
            outbox = self._outboxes.pop(sock, None)
        if outbox is not None:
            outbox.abandon()

    def send(self, kind: FrameKind, header: dict[str, Any], exclude: Collection[socket.socket] = ()) -> None:
        """Queue one frame for every subscriber but those in ``exclude`` (never blocks)."""
        with self._lock:
            outboxes = [outbox for sock, outbox in self._outboxes.items() if sock not in exclude]
        for outbox in outboxes:
            outbox.put((kind, header))

    def send_to(self, sock: socket.socket, kind: FrameKind, header: dict[str, Any]) -> None:
        """Queue one frame for one subscriber, in order with the broadcast frames it gets."""
        with self._lock:
            outbox = self._outboxes.get(sock)
        if outbox is not None:
            outbox.put((kind, header))
