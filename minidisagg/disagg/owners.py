"""Which router owns each request on a decode worker, and which router connections speak for which owner.

Several routers may share the workers of a deployment, and every one of them holds the
deployment's secret. So that none can disturb another's requests, each router makes an opaque
random token (its *owner* token) and

- puts it in every submission (``Submission.owner``); the prefill worker hands it on with the
  request's state (``SequenceState.owner``);
- tells each worker, once per connection, REQUEST ``{"owner": token}`` (a prefill worker checks aborts
  against it the same way, ``PrefillWorker.abort_as``).

A decode worker then (``RequestOwners``) takes no second request under an id it already
decodes, lets a router abort only requests carrying its own token (another's abort gets an
ERROR naming the id, and nothing is aborted), and (``OwnerConnections``) sends a request's
outputs only to its owner's connections; when the last of them closes, the owner's requests are
aborted and their KV blocks freed (the router fails or recomputes them anyway once it loses
its link), and a request arriving later under that owner is refused. So a router must register
its token on its decode connections before it submits (``RemoteWorker`` does, on connect). The
worker claims a request's id before it checks that the owner is connected, and a closing
connection drops its registration before it aborts the owner's claimed requests, so a request
committed as its router leaves is either refused or aborted, never left to decode into the void. Requests without a token (in-process clusters,
routers that do not send one) keep the older behaviour: anyone may abort them, and their
outputs go to every router connection that registered no token; a router that did register
one never sees them, so no peer can feed it outputs under one of its ids. A token is only as
secret as the links it crosses: use TLS where the network is not trusted.
"""

from __future__ import annotations

import threading
from typing import Generic, Hashable, Optional, TypeVar

Conn = TypeVar("Conn", bound=Hashable)


class NotOwner(ValueError):
    """An abort (or another request) for a request that another router submitted."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"abort: request {request_id!r} was submitted by another router; a router may abort only "
                         f"its own requests, so nothing was aborted")
        self.request_id = request_id


class RequestOwners:
    """The owner token (or None) of every request a decode worker holds, from its commit until it ends (thread-safe)."""

    def __init__(self) -> None:
        self._owners: dict[str, Optional[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._owners)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._owners

    def claim(self, request_id: str, owner: Optional[str], worker: str) -> None:
        """Record a request arriving at ``worker``; ValueError if a request of that id is already there."""
        with self._lock:
            if request_id in self._owners:
                raise ValueError(f"request id {request_id!r} is already decoding on {worker}: a second request "
                                 f"under the same id was refused")
            self._owners[request_id] = owner

    def release(self, request_id: str) -> None:
        """The request ended (finished, failed or aborted): forget it."""
        with self._lock:
            self._owners.pop(request_id, None)

    def owner_of(self, request_id: str) -> Optional[str]:
        """The request's owner token (None: no such request, or one without an owner)."""
        with self._lock:
            return self._owners.get(request_id)

    def request_ids(self) -> list[str]:
        """The ids of every request held here (whatever its owner)."""
        with self._lock:
            return list(self._owners)

    def held_by(self, owner: str) -> list[str]:
        """The ids of the requests held here under ``owner``."""
        with self._lock:
            return [rid for rid, holder in self._owners.items() if holder == owner]

    def check_abort(self, request_id: str, owner: Optional[str]) -> None:
        """Raise ``NotOwner`` when ``request_id`` is held here with a token other than ``owner``."""
        with self._lock:
            holder = self._owners.get(request_id)
        if holder is not None and holder != owner:
            raise NotOwner(request_id)

    def clear(self) -> None:
        """Forget every request (the worker failed them all)."""
        with self._lock:
            self._owners.clear()


class OwnerConnections(Generic[Conn]):
    """Which connections belong to which owner token: one token per connection, set once (thread-safe)."""

    def __init__(self) -> None:
        self._token_of: dict[Conn, str] = {}
        self._conns_of: dict[str, set[Conn]] = {}
        self._lock = threading.Lock()

    def register(self, conn: Conn, token: str) -> None:
        """``conn`` speaks for ``token`` from now on; ValueError if it already spoke for another."""
        with self._lock:
            known = self._token_of.get(conn)
            if known is not None and known != token:
                raise ValueError("owner: this connection already registered another owner token")
            self._token_of[conn] = token
            self._conns_of.setdefault(token, set()).add(conn)

    def token_of(self, conn: Conn) -> Optional[str]:
        """The token ``conn`` registered (None: none)."""
        with self._lock:
            return self._token_of.get(conn)

    def connections(self, token: str) -> list[Conn]:
        """The live connections of ``token``'s router."""
        with self._lock:
            return list(self._conns_of.get(token, ()))

    def registered(self) -> set[Conn]:
        """Every connection that registered a token."""
        with self._lock:
            return set(self._token_of)

    def remove(self, conn: Conn) -> None:
        """``conn`` closed."""
        with self._lock:
            token = self._token_of.pop(conn, None)
            if token is not None:
                conns = self._conns_of.get(token, set())
                conns.discard(conn)
                if not conns:
                    self._conns_of.pop(token, None)
