"""Listening ports: accept connections, one thread each, and never more than a set number at once.

Every worker port and the router's client port hand each accepted connection to a handler on
a thread of its own. Without a cap, a peer that opens connections and leaves them idle (or a
plain flood) would make as many threads as it likes. ``accept_loop`` serves at most
``max_connections`` at once (``LinkConfig.max_connections``, ``--max-connections``); one more is
refused at once, on the accepting thread, with a message that says why (``refuse`` writes it
in the port's own protocol: an ERROR frame on a worker port, an error line on the router's),
then closed. Refusals are logged, at most once per ``REFUSAL_LOG_EVERY_S`` with their count.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)
REFUSAL_TIMEOUT_S = 0.5  # a refusal is written on the accepting thread: it may never block it for long
REFUSAL_LOG_EVERY_S = 10.0
BACKLOG = 64

Handler = Callable[[socket.socket, str], None]
Refuse = Callable[[socket.socket, str], None]


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    server = socket.create_server((host, port), reuse_port=False)
    server.listen(BACKLOG)
    return server


def too_many_connections(name: str, max_connections: int) -> str:
    """The words a refused peer reads: who refused, the limit, and the flag that sets it."""
    return (f"{name} refused the connection: it already serves its maximum of {max_connections} connections "
            f"(--max-connections / LinkConfig.max_connections); try again later")


class ConnectionLimit:
    """A count of the connections a listener serves, capped at ``max_connections`` (thread-safe)."""

    def __init__(self, max_connections: Optional[int]) -> None:
        if max_connections is not None and (isinstance(max_connections, bool) or max_connections < 1):
            raise ValueError(f"max_connections must be an integer >= 1 or None, got {max_connections!r}")
        self.max_connections = max_connections
        self.active = 0
        self.num_refused = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Count one more connection; False (and counted as refused) when the cap is reached."""
        with self._lock:
            if self.max_connections is not None and self.active >= self.max_connections:
                self.num_refused += 1
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        """One connection ended."""
        with self._lock:
            self.active -= 1


def close_quietly(sock: socket.socket) -> None:
    """Close a socket, ignoring errors."""
    with contextlib.suppress(OSError):
        sock.close()


def accept_loop(server: socket.socket, handler: Handler, stop: threading.Event, name: str,
                max_connections: Optional[int] = None, refuse: Optional[Refuse] = None,
                limit: Optional[ConnectionLimit] = None) -> None:
    """Accept connections until ``stop``; each is handled on its own daemon thread, at most ``max_connections`` at once.

    One over the cap goes to ``refuse(conn, message)`` (bounded by ``REFUSAL_TIMEOUT_S``; the
    default writes nothing) and is closed. ``limit`` lets the caller watch the count (else one is made).
    """
    limit = limit if limit is not None else ConnectionLimit(max_connections)
    server.settimeout(0.2)
    last_log_s, refused_since_log = -REFUSAL_LOG_EVERY_S, 0
    while not stop.is_set():
        try:
            conn, addr = server.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        peer = f"{addr[0]}:{addr[1]}"
        if not limit.enter():
            refused_since_log += 1
            if time.monotonic() - last_log_s >= REFUSAL_LOG_EVERY_S:
                log.warning("%s: refused %d connection(s) (latest from %s): already serving %d, the maximum "
                            "(--max-connections)", name, refused_since_log, peer, limit.max_connections)
                last_log_s, refused_since_log = time.monotonic(), 0
            if refuse is not None:
                conn.settimeout(REFUSAL_TIMEOUT_S)
                with contextlib.suppress(OSError, ValueError):
                    refuse(conn, too_many_connections(name, limit.max_connections or 0))
            close_quietly(conn)
            continue
        conn.settimeout(None)

        def serve(conn: socket.socket = conn, peer: str = peer) -> None:
            try:
                handler(conn, peer)
            finally:
                limit.leave()

        try:
            threading.Thread(target=serve, name=f"{name}-{peer}", daemon=True).start()
        except RuntimeError:  # the interpreter cannot make another thread: refuse this one
            limit.leave()
            close_quietly(conn)
